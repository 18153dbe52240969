"""Sign-ups that never fail because Engage is down. Run: uvicorn app:app."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import engage_async as ea

# ENGAGE_BASE_URL, ENGAGE_API_KEY, ENGAGE_USER_AGENT, and ENGAGE_OUTBOX as an absolute path.
config = ea.EngageConfig.from_env()


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Open one session for the app's lifetime, and a flusher that drains the outbox."""
    async with ea.EngageSession(config) as engage, ea.OutboxFlusher(config) as flusher:
        flusher.start()  # in the background until the app stops
        app.state.engage = engage
        yield


async def sign_up(request: Request) -> JSONResponse:
    """Create the customer in Engage: delivered, or queued if Engage cannot take it now."""
    form = await request.json()
    delivery = await request.app.state.engage.create_contact(
        {"email": form["email"], "firstName": form["firstName"]},
        contact_type="Member",
        source="e-com",
        store_external_id="600",
    )
    # Delivered or queued, the customer carries on; keep the ref (or the GUID once known).
    answer = {"ref": delivery.ref, "contactId": delivery.contact_id, "queued": delivery.queued}
    return JSONResponse(answer)


app = Starlette(routes=[Route("/signup", sign_up, methods=["POST"])], lifespan=lifespan)
