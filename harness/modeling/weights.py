"""Pretrained initialisation from local files: where weights come from, what they load into, what stays frozen.

Nothing is ever downloaded. A weights reference is either a local path or
``torchvision:<Weights enum>.<member>`` (e.g. ``torchvision:ResNet50_Weights.IMAGENET1K_V1``),
which names the file torchvision itself would cache (``$TORCH_HOME/hub/checkpoints/<file>``,
the basename of the enum's URL); when it is absent the error says which file to put where,
so a cluster without internet can be provisioned by copying files.

``backbone_weights`` is a *classification* checkpoint: its classifier (``fc.*`` for
ResNets, ``classifier.*`` for MobileNet) is dropped; every other key must match the
backbone exactly (a missing or unexpected key, or a shape mismatch, is an error naming it),
because a silently half-loaded backbone trains to a plausible but wrong number.

``trainable_layers`` follows torchvision (``_resnet_fpn_extractor`` / ``_mobilenet_extractor``):
the last N stages of the body get gradients, the rest are frozen; 5 = all (ResNet: with
``bn1``), 0 = none.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from harness.core import ConfigError

PREFIX = "torchvision:"
CLASSIFIER_KEYS = ("fc.", "classifier.")  # classification heads of torchvision's ResNets / MobileNets
RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")  # trained first .. last


def torchvision_weights(ref: str, *, field: str | None = None):
    """The torchvision weights enum member a ``torchvision:<Enum>.<member>`` reference names."""
    from torchvision.models import get_weight
    name = ref[len(PREFIX):]
    try:
        return get_weight(name)
    except (ValueError, KeyError, AttributeError, ImportError) as exc:
        raise ConfigError(f"{ref!r} is not a torchvision weights name (e.g. "
                          f"'torchvision:ResNet50_Weights.IMAGENET1K_V1'): {exc}", field=field) from None


def cache_file(ref: str, *, field: str | None = None) -> Path:
    """Where torchvision keeps the file of ``ref`` (a ``torchvision:`` name); not checked for existence."""
    weights = torchvision_weights(ref, field=field)
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def resolve(ref: str, *, field: str | None = None, base: Path | None = None) -> Path:
    """The local file of a weights reference; a clear error when it is not there."""
    if ref.startswith(PREFIX):
        path = cache_file(ref, field=field)
        if not path.is_file():
            url = torchvision_weights(ref).url
            raise ConfigError(f"{ref} is not in torchvision's cache: put the file {path.name} (from {url}) at "
                              f"{path} (TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}); "
                              "nothing is downloaded", field=field)
        return path
    path = Path(os.path.expandvars(os.path.expanduser(ref)))
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise ConfigError("weights file not found", file=path, field=field)
    return path


#: torchvision's two legacy COCO checkpoints were trained with FrozenBatchNorm2d's eps at 0; its
#: builders set it back to 0 after loading them (``overwrite_eps``), and we do the same, by file name.
ZERO_EPS_FILES = ("fasterrcnn_resnet50_fpn_coco-258fb6c6.pth", "retinanet_resnet50_fpn_coco-eeacb38b.pth")


def zero_eps_checkpoint(ref: str) -> bool:
    """Whether a detector checkpoint is one of torchvision's legacy COCO_V1 files (frozen BN eps 0)."""
    name = cache_file(ref).name if ref.startswith(PREFIX) else Path(ref).name
    return name in ZERO_EPS_FILES


def _comparable(keys) -> set[str]:
    return {k for k in keys if not k.endswith("num_batches_tracked")}  # BN's counter: FrozenBN has none


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file; only tensors and plain containers are unpickled."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("checkpoint file not found", file=path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file or a pickle with code in it
        raise ConfigError(f"cannot load checkpoint safely: {exc}", file=path) from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError("checkpoint is not a state dict", file=path)
    return state


def load_backbone_weights(net: nn.Module, ref: str, *, field: str = "detector.backbone_weights") -> None:
    """Load a classification checkpoint into ``net`` (a whole torchvision classifier, before its
    stages are extracted), dropping the classifier; any other mismatch is an error naming the key."""
    path = resolve(ref, field=field)
    state = {k: v for k, v in load_state(path).items() if not k.startswith(CLASSIFIER_KEYS)}
    if not all(torch.is_tensor(v) for v in state.values()):
        bad = next(k for k, v in state.items() if not torch.is_tensor(v))
        raise ConfigError(f"not a state dict of tensors: key {bad!r} holds a {type(state[bad]).__name__}",
                          file=path, field=field)
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(CLASSIFIER_KEYS)}
    missing = sorted(_comparable(own) - _comparable(state))
    unexpected = sorted(_comparable(state) - _comparable(own))
    if missing or unexpected:
        what = (f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}")
        count = f" ({len(missing)} missing, {len(unexpected)} unexpected)"
        raise ConfigError(f"not a checkpoint of this backbone ({type(net).__name__}): {what}{count}",
                          file=path, field=field)
    for key in sorted(_comparable(own)):
        if own[key].shape != state[key].shape:
            raise ConfigError(f"shape mismatch at key {key!r}: file {tuple(state[key].shape)}, backbone "
                              f"{tuple(own[key].shape)}", file=path, field=field)
    net.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def freeze_resnet_stages(body: nn.Module, trainable_layers: int) -> None:
    """A ResNet's stages, torchvision's ``_resnet_fpn_extractor``: layer4 .. layer1, then conv1 with bn1."""
    train = list(RESNET_STAGES[:trainable_layers]) + (["bn1"] if trainable_layers == 5 else [])
    for name, p in body.named_parameters():
        if not name.startswith(tuple(train)):
            p.requires_grad_(False)


def freeze_mobilenet_stages(body: nn.Module, trainable_layers: int) -> None:
    """MobileNetV3's ``features``, torchvision's ``_mobilenet_extractor``: the stages are the blocks
    torchvision marks ``_is_cn`` (plus the first and last), so 5 leaves the stem frozen."""
    stages = [0] + [i for i, b in enumerate(body) if getattr(b, "_is_cn", False)] + [len(body) - 1]
    first_trained = len(body) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
    for block in list(body)[:first_trained]:
        for p in block.parameters():
            p.requires_grad_(False)


__all__ = ["resolve", "cache_file", "zero_eps_checkpoint", "torchvision_weights", "load_backbone_weights", "load_state",
           "freeze_resnet_stages", "freeze_mobilenet_stages"]
