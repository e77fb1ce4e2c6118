"""torch.hub entry points: one per arch and pooling.

    model = torch.hub.load("/path/to/dino-simpool", "vit_small_simpool", source="local", weights="export/")

``weights=None`` (default) builds a randomly initialised backbone (keyword arguments go to ``build_backbone``, e.g.
``depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32`` for a tiny model). ``weights=PATH`` loads a folder
(or a weight file in it) written by ``dino-simpool-export``: the architecture comes from its ``config.json``, which
must name the entry's arch and pooling. Nothing is downloaded. The model is a ``dino_simpool`` ``Backbone``:
``model(x)`` is the pooled embedding (B, d); ``model.attention_maps(x)`` gives the attention maps.

Entries: ``<arch>_simpool`` for every arch, ``<vit>_cls`` / ``<vit>_gap`` for ViTs and ``<cnn>_gap`` for CNNs;
``ENTRIES`` holds their names. ``torch.hub.list`` and ``torch.hub.help`` take a GitHub ``owner/repo[:ref]`` only
(they download it, and unlike ``torch.hub.load`` they have no ``source="local"``), so on a local checkout, offline,
read this module instead:

    import sys; sys.path.insert(0, "/path/to/dino-simpool"); import hubconf
    print(hubconf.ENTRIES)                    # the names torch.hub.list would give
    print(hubconf.vit_small_simpool.__doc__)  # the text torch.hub.help would give
"""
dependencies = ["torch", "timm"]


def _make_entry(arch: str, pooling: str):
    def entry(weights=None, **kwargs):
        # imported on call: torch.hub reads `dependencies` after importing this file, so a missing timm gets its message
        from dino_simpool.models.backbones import build_backbone

        if weights is None:
            kwargs.setdefault("pooling", pooling)
            if kwargs["pooling"] != pooling:
                raise ValueError(f"{arch}_{pooling} builds pooling={pooling!r}; use the {arch}_{kwargs['pooling']} entry")
            return build_backbone(arch, **kwargs)
        from dino_simpool.export import load_exported, read_export_config

        if kwargs:
            raise ValueError(f"with weights=, the architecture comes from the export's config.json; drop {sorted(kwargs)}")
        meta = read_export_config(weights)
        if (meta["arch"], meta["pooling"]) != (arch, pooling):
            raise ValueError(f"{weights} holds {meta['arch']}/{meta['pooling']}; load it with the "
                             f"'{meta['arch']}_{meta['pooling']}' entry, not '{arch}_{pooling}'")
        return load_exported(weights)

    entry.__name__ = entry.__qualname__ = f"{arch}_{pooling}"
    entry.__doc__ = (f"{arch} with {pooling} pooling (dino-simpool Backbone). weights=None: random init "
                     f"(kwargs go to build_backbone); weights=PATH: an export folder or file from dino-simpool-export.")
    return entry


_VITS = ("vit_tiny", "vit_small", "vit_base")
_CNNS = ("resnet18", "resnet50", "resnet_test", "convnext_tiny", "convnext_small", "convnext_test")
for _arch in _VITS:
    for _pool in ("simpool", "cls", "gap"):
        globals()[f"{_arch}_{_pool}"] = _make_entry(_arch, _pool)
for _arch in _CNNS:
    for _pool in ("simpool", "gap"):
        globals()[f"{_arch}_{_pool}"] = _make_entry(_arch, _pool)
del _arch, _pool
#: the entry names, as torch.hub.list gives them (public callables; a tuple, so not an entry itself)
ENTRIES = tuple(sorted(n for n, v in globals().items() if callable(v) and not n.startswith("_")))
