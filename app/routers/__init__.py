"""The HTTP surface: `/v1` (every route behind `authenticate`), `/v1/public` (signed links) and health."""

from fastapi import APIRouter, Depends

from app.routers import attributes, consents, contacts, health, lists, orders, public, timeline, tokens
from app.routers.deps import AUTH_PROBLEMS
from app.security import authenticate

__all__ = ["health_router", "public_router", "v1_router"]

# Authenticated by default: a route added here can never be open by accident.
v1_router = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)], responses=AUTH_PROBLEMS)
v1_router.include_router(contacts.router)
v1_router.include_router(attributes.attributes_router)
v1_router.include_router(attributes.tags_router)
v1_router.include_router(tokens.router)
v1_router.include_router(tokens.me_router)
v1_router.include_router(orders.orders_router)
v1_router.include_router(orders.events_router)
v1_router.include_router(orders.contact_activity_router)
v1_router.include_router(lists.router)
v1_router.include_router(consents.router)
v1_router.include_router(timeline.router)

health_router = health.router
# No token: the signed link in the URL is the credential (app.services.links).
public_router = public.router
