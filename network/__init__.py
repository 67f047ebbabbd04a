"""Classification networks for EPS (see network/registry.py for the table of networks).

``from network import NETWORKS, build_network, normalize_network_name`` works as usual; the
registry is imported on first use (PEP 562) so that ``import network.losses`` stays light and
``python -m network.resnet38d`` runs its smoke check without importing itself twice.
"""
_REGISTRY_NAMES = ("NETWORKS", "BACKBONES", "HEADS", "build_network", "normalize_network_name",
                   "network_parts", "get_head", "register_head", "register_backbone",
                   "unregister_head", "unregister_backbone", "registered")


def __getattr__(name):
    if name in _REGISTRY_NAMES:
        from network import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'network' has no attribute {name!r}")


__all__ = list(_REGISTRY_NAMES)
