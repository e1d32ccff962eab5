"""meshchat: an MQTT messaging backbone for thin, flaky links; end-to-end encrypted, org-aware."""

from meshchat.errors import MeshchatError

__all__ = ["MeshchatError", "__version__"]

__version__ = "0.1.0.dev0"
