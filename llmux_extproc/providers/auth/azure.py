"""Azure OpenAI credentials: an Entra ID (Azure AD) bearer token, else the `api-key`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from llmux_extproc.errors import GatewayError
from llmux_extproc.providers.auth import BackendAuth, litellm_param

if TYPE_CHECKING:
    from llmux_extproc.control.config import Deployment
    from llmux_extproc.providers.base import UpstreamRequest


def auth_header(dep: Deployment) -> dict[str, str]:
    """The one header Azure authenticates with; 401 when the deployment has neither."""
    token = litellm_param(dep.params, "azure_ad_token") or (
        None if dep.api_key else os.environ.get("AZURE_AD_TOKEN")
    )
    if token:
        return {"authorization": f"Bearer {token.removeprefix('Bearer ')}"}
    if dep.api_key:
        return {"api-key": dep.api_key}
    raise GatewayError(
        401,
        "No Azure credentials for this deployment: set litellm_params.api_key (or "
        "AZURE_API_KEY) or litellm_params.azure_ad_token.",
        code="missing_credentials",
    )


class AzureAuth(BackendAuth):
    headers = frozenset({"authorization", "api-key"})

    def apply(self, dep: Deployment, request: UpstreamRequest) -> None:
        request.headers.update(auth_header(dep))
