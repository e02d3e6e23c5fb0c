"""Operator authentication: `Authorization: Bearer $GATEWAY_OPERATOR_TOKEN`."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.context import Context, context

bearer = HTTPBearer(auto_error=False, description="Operator token (GATEWAY_OPERATOR_TOKEN)")


async def require_operator(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ctx: Annotated[Context, Depends(context)],
) -> None:
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing operator token: send Authorization: Bearer <token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    expected = ctx.settings.operator_token.encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid operator token",
            headers={"WWW-Authenticate": "Bearer"},
        )


Operator = Depends(require_operator)
