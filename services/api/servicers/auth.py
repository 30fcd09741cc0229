"""``AuthService.WhoAmI``: the caller's principal and roles, as the auth interceptor found them."""

from __future__ import annotations

from services.api._rpc import rpc
from services.api.auth import DEVELOPMENT, current_principal
from services.api.servicers.requests import Context
from shared.gen.automation.v1 import auth_pb2, auth_pb2_grpc


class AuthService(auth_pb2_grpc.AuthServiceServicer):
    @rpc
    async def WhoAmI(self, request: auth_pb2.WhoAmIRequest, context: Context) -> auth_pb2.WhoAmIResponse:
        principal = current_principal()
        return auth_pb2.WhoAmIResponse(
            name=principal.name, roles=sorted(principal.roles), authentication=principal is not DEVELOPMENT
        )
