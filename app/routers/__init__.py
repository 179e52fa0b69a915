"""The HTTP surface: `/v1` (every route behind `authenticate`), `/v1/public` (signed links) and health."""

from fastapi import APIRouter

from app.routers import (
    attributes,
    consents,
    contacts,
    destinations,
    erasure_requests,
    gdpr,
    health,
    imports,
    inbound,
    journal,
    lists,
    orders,
    preferences,
    public,
    segments,
    signup,
    timeline,
    tokens,
)
from app.routers.deps import AUTH_PROBLEMS

__all__ = ["health_router", "inbound_router", "public_router", "v1_router"]

# Every route declares its scopes with `require(...)`, which authenticates; tests/test_auth.py fails the
# build for any /v1 operation without declared scopes. (A router-level `Depends(authenticate)` as well
# doubled dependency resolution on every request: measured in bench/.)
v1_router = APIRouter(prefix="/v1", responses=AUTH_PROBLEMS)
v1_router.include_router(contacts.router)
v1_router.include_router(attributes.attributes_router)
v1_router.include_router(attributes.tags_router)
v1_router.include_router(tokens.router)
v1_router.include_router(tokens.me_router)
v1_router.include_router(orders.orders_router)
v1_router.include_router(orders.carts_router)
v1_router.include_router(orders.events_router)
v1_router.include_router(orders.contact_activity_router)
v1_router.include_router(lists.router)
v1_router.include_router(consents.router)
v1_router.include_router(timeline.router)
v1_router.include_router(gdpr.router)
v1_router.include_router(preferences.links_router)
v1_router.include_router(erasure_requests.router)
v1_router.include_router(segments.router)
v1_router.include_router(imports.router)
v1_router.include_router(destinations.router)
v1_router.include_router(destinations.deliveries_router)
v1_router.include_router(journal.router)

health_router = health.router
# No token: the signed link in the URL is the credential (app.services.links); signups carry CORS and limits.
public_router = APIRouter()
public_router.include_router(public.router)
public_router.include_router(signup.router)
public_router.include_router(preferences.router)
# No token: each destination's own secret or signature (app.routers.inbound).
inbound_router = inbound.router
