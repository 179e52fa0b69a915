"""The HTTP surface: `/v1` (every route behind `authenticate`) and the unauthenticated health routes."""

from fastapi import APIRouter, Depends

from app.routers import attributes, contacts, health, tokens
from app.routers.deps import AUTH_PROBLEMS
from app.security import authenticate

__all__ = ["health_router", "v1_router"]

# Authenticated by default: a route added here can never be open by accident.
v1_router = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)], responses=AUTH_PROBLEMS)
v1_router.include_router(contacts.router)
v1_router.include_router(attributes.attributes_router)
v1_router.include_router(attributes.tags_router)
v1_router.include_router(tokens.router)
v1_router.include_router(tokens.me_router)

health_router = health.router
