"""Whether the routes that change the models folder are served at all.

``POST /api/pull`` writes gigabytes to disk (and makes the server fetch URLs), ``DELETE
/api/models/{id}`` removes files. On a loopback bind only this machine can ask; with an API key
only its holders. A server bound to another address without a key would let anyone on the
network do both, so they are off there unless ``open_model_admin`` says otherwise.
"""

from __future__ import annotations

from shimmy.api.security import is_loopback_host, keys_configured
from shimmy.errors import Forbidden
from shimmy.settings import Settings


def model_admin_refusal(settings: Settings) -> Forbidden | None:
    """The error to answer pulls and deletions with; None when they are allowed."""
    if settings.open_model_admin or keys_configured(settings) or is_loopback_host(settings.host):
        return None
    return Forbidden(
        f"downloading and deleting models is off: the server listens on {settings.host} "
        "without an API key (set --api-key, or --open-model-admin to allow it anyway)"
    )


def check_model_admin(settings: Settings) -> None:
    refusal = model_admin_refusal(settings)
    if refusal is not None:
        raise refusal
