"""Operator authentication: `Authorization: Bearer $GATEWAY_OPERATOR_TOKEN`."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.context import Context, context
from api.responses import unauthorized

bearer = HTTPBearer(auto_error=False, description="Operator token (GATEWAY_OPERATOR_TOKEN)")


async def require_operator(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ctx: Annotated[Context, Depends(context)],
) -> None:
    if credentials is None:
        raise unauthorized("missing operator token: send Authorization: Bearer <token>")
    expected = ctx.settings.operator_token.encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise unauthorized("invalid operator token")


Operator = Depends(require_operator)
