"""A device's live MQTT connections, closed through RabbitMQ's management API.

Disabling a device or rotating its token refuses its next login at once (every login asks the
api), but a connection already open would live on: whoever makes the change closes it, with
`DELETE /api/connections/username/<device id>` as the broker administrator. RabbitMQ closes
every connection of that user (and publishes a Last Will the device set). Heartbeats the device
sent before the close and still queued are dead-lettered by the worker (`device_disabled`).
"""

from __future__ import annotations

import base64
import logging
import urllib.error
import urllib.parse
import urllib.request

from gateway.runtime import metrics

log = logging.getLogger(__name__)

TIMEOUT_S = 5.0


class SessionsNotClosed(RuntimeError):
    """The broker could not be asked to close the device's connections."""


def close_device_sessions(management_url: str, device_id: str, timeout: float = TIMEOUT_S) -> None:
    """Close every broker connection of `device_id` (none open is fine). Raises
    `SessionsNotClosed` when the management API cannot be reached or refuses."""
    url = urllib.parse.urlsplit(management_url)
    credentials = f"{urllib.parse.unquote(url.username or '')}:"
    credentials += urllib.parse.unquote(url.password or "")
    base = f"{url.scheme}://{url.hostname}" + (f":{url.port}" if url.port else "")
    request = urllib.request.Request(
        f"{base}/api/connections/username/{urllib.parse.quote(device_id, safe='')}",
        method="DELETE",
        headers={
            "Authorization": "Basic " + base64.b64encode(credentials.encode()).decode(),
            "X-Reason": "device disabled or its token rotated",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code != 404:  # no connection at all
            raise SessionsNotClosed(f"the broker answered {exc.code}") from None
    except (OSError, ValueError) as exc:
        raise SessionsNotClosed(f"the broker's management API is unreachable: {exc}") from None


def close_sessions(management_url: object | None, device_id: str) -> bool:
    """`close_device_sessions`, or a warning (and a count) when it cannot be done."""
    if management_url is None:
        problem = "GATEWAY_BROKER_MANAGEMENT_URL is not set"
    else:
        try:
            close_device_sessions(str(management_url), device_id)
        except SessionsNotClosed as exc:
            problem = str(exc)
        else:
            return True
    metrics.SESSION_CLOSE_FAILURES.inc()
    log.warning(
        "open connections of %s may remain (its next logins are refused): %s", device_id, problem
    )
    return False
