"""Documented error responses: every route says which errors it may answer, as `{"detail"}`."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, status
from pydantic import BaseModel


class Problem(BaseModel):
    """An error: `detail` says what is wrong, in words a person can act on."""

    detail: str


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Bad request: a cursor this API did not return, or a body that is not JSON",
        401: "Missing or invalid token",
        403: "The token may not do this",
        404: "No such device",
        409: "Already exists",
        413: "Payload over 16 KiB",
        415: "Not JSON",
        422: "Invalid input; `detail` names the field",
        503: (
            "A dependency (broker or database) is unavailable, or a query ran longer than the "
            "api allows; nothing was changed, retry after `Retry-After` seconds"
        ),
    }
    return {code: {"model": Problem, "description": descriptions[code]} for code in codes}


def unauthorized(detail: str) -> HTTPException:
    """401 with the challenge a bearer-token client expects."""
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"}
    )
