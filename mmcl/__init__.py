"""mmcl: audio-visual-text contrastive pretraining (CLIP/SigLIP, Symile, GRAM) over WebDataset shards."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import mmcl` (e.g. for the CLI's --help) does not pull in torch and the towers.
    if name == "MultimodalModel":
        from mmcl.model import MultimodalModel

        return MultimodalModel
    raise AttributeError(f"module 'mmcl' has no attribute {name!r}")


__all__ = ["MultimodalModel", "__version__"]
