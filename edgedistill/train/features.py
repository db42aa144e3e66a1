"""Feature distillation: stage taps, the automatic student-to-teacher stage mapping, training-only projections.

Stages come from timm's ``feature_info`` (the modules ``features_only`` would return: channels, reduction)
or, for models without it (torchvision's SqueezeNet), from the children of ``model.features``: the last
module before each spatial reduction. Both are read through forward hooks on the unchanged model, so the
student that is saved and exported is the bare student; the projections live in ``FeatureMatcher`` and
are thrown away after training.

Automatic mapping (``distill.features: auto``): every student stage is paired with the teacher stage of
the same nominal reduction (2, 4, 8, ... of the input) at the closest relative depth (stage index / stage
count); a stage whose reduction the teacher lacks takes the closest reduction. A learned 1x1 conv + BN
projection maps student channels to teacher channels where they differ (FitNets, Romero et al. 2015);
attention transfer (Zagoruyko & Komodakis 2017) compares channel-averaged maps and needs none.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from edgedistill.errors import RecipeError
from edgedistill.recipe.sections import FeaturePair
from edgedistill.train.losses import FeatureProjector, attention_loss, feature_loss

# feature_weight when the recipe leaves it unset: MSE hints are O(1); the attention-transfer distance is
# a mean over normalised maps, O(1/HW), and its authors weigh it by 1e3.
DEFAULT_WEIGHTS = {"mse": 1.0, "at": 1000.0}


@dataclass(frozen=True)
class Stage:
    name: str  # module path inside the model (model.get_submodule(name))
    channels: int
    height: int
    width: int
    reduction: int  # nominal: a power of two, input size / map size
    depth: float  # (index + 1) / number of stages


def _output_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise RecipeError(f"a feature tap returned {type(output).__name__}, not a tensor")


class FeatureTaps:
    """Forward hooks that keep the outputs of named modules of one model (the latest forward pass)."""

    def __init__(self, model: nn.Module, names: Sequence[str], role: str):
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise RecipeError(
                    f"distill.features: the {role} ({type(model).__name__}) has no module '{name}'; "
                    f"its stages are {[s.name for s in model_stages(model, 32)]}"
                ) from None
            self._handles.append(module.register_forward_hook(self._keeper(name)))

    def _keeper(self, name: str):
        def hook(_module, _inputs, output):
            self.outputs[name] = _output_tensor(output)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _stage_names(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    if info is not None:  # timm: a list of dicts, or a FeatureInfo object
        entries = info.info if hasattr(info, "info") else info
        names = [e["module"] for e in entries if "module" in e]
        if names:
            return names
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return [f"features.{i}" for i in range(len(features))]  # every child; narrowed by the probe
    raise RecipeError(
        f"{type(model).__name__} exposes no stages (no timm feature_info, no .features sequence): "
        f"name the modules to match with distill.features: [{{teacher: NAME, student: NAME}}]"
    )


@torch.no_grad()
def probe(model: nn.Module, names: Sequence[str], image_size: int) -> dict[str, tuple[int, ...]]:
    """Output shapes (C, H, W) of the named modules for one image of ``image_size``."""
    taps = FeatureTaps(model, names, "model")
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters())
        model(torch.zeros(1, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(was_training)
        taps.remove()
    return {name: tuple(t.shape[1:]) for name, t in taps.outputs.items()}


def _nominal_reduction(image_size: int, height: int) -> int:
    return 2 ** max(0, round(math.log2(image_size / max(height, 1))))


def model_stages(model: nn.Module, image_size: int) -> list[Stage]:
    """The model's stages with their channels and map sizes at ``image_size``."""
    names = _stage_names(model)
    shapes = probe(model, names, image_size)
    names = [n for n in names if n in shapes and len(shapes[n]) == 3]
    if names and names[0].startswith("features.") and not hasattr(model, "feature_info"):
        # children of a Sequential: keep the last module before each spatial reduction, and the last one
        names = [n for i, n in enumerate(names) if i == len(names) - 1 or shapes[names[i + 1]][1:] != shapes[n][1:]]
    if not names:
        raise RecipeError(f"{type(model).__name__}: no stage gives a feature map at {image_size} px")
    return [
        Stage(
            name=n,
            channels=shapes[n][0],
            height=shapes[n][1],
            width=shapes[n][2],
            reduction=_nominal_reduction(image_size, shapes[n][1]),
            depth=(i + 1) / len(names),
        )
        for i, n in enumerate(names)
    ]


def auto_map(student: list[Stage], teacher: list[Stage]) -> list[tuple[Stage, Stage]]:
    """Each student stage -> the teacher stage of equal reduction (else the closest) at the nearest depth."""
    pairs = []
    for s in student:
        gap = min(abs(math.log2(t.reduction) - math.log2(s.reduction)) for t in teacher)
        candidates = [t for t in teacher if abs(math.log2(t.reduction) - math.log2(s.reduction)) == gap]
        pairs.append((s, min(candidates, key=lambda t: (abs(t.depth - s.depth), -t.depth))))
    return pairs


def resolve_pairs(
    spec: Union[str, list[FeaturePair]], student: nn.Module, teacher: nn.Module, image_size: int
) -> list[tuple[Stage, Stage]]:
    """The (student stage, teacher stage) pairs a recipe's ``distill.features`` asks for."""
    s_stages, t_stages = model_stages(student, image_size), model_stages(teacher, image_size)
    if spec == "auto":
        return auto_map(s_stages, t_stages)
    if spec == "last":
        return [(s_stages[-1], t_stages[-1])]
    assert isinstance(spec, list)
    s_shapes = probe(student, [p.student for p in spec], image_size)
    t_shapes = probe(teacher, [p.teacher for p in spec], image_size)
    pairs = []
    for p in spec:
        for role, shapes, name in (("student", s_shapes, p.student), ("teacher", t_shapes, p.teacher)):
            if len(shapes.get(name, ())) != 3:
                raise RecipeError(
                    f"distill.features: the {role}'s module '{name}' does not output a feature map "
                    f"(got shape {shapes.get(name)}); its stages are "
                    f"{[s.name for s in (s_stages if role == 'student' else t_stages)]}"
                )
        c, h, w = s_shapes[p.student]
        tc, th, tw = t_shapes[p.teacher]
        pairs.append(
            (
                Stage(p.student, c, h, w, _nominal_reduction(image_size, h), 0.0),
                Stage(p.teacher, tc, th, tw, _nominal_reduction(image_size, th), 0.0),
            )
        )
    return pairs


class FeatureMatcher(nn.Module):
    """The feature term of the student's loss: taps on both models, one projection per pair where needed.

    ``loss()`` is the mean over pairs of MSE(proj(student map), teacher map) or of the attention-transfer
    distance, after the forward passes of student and teacher. Only the projections have parameters.
    """

    def __init__(self, pairs: list[tuple[Stage, Stage]], loss: str = "mse"):
        super().__init__()
        if loss not in DEFAULT_WEIGHTS:
            raise RecipeError(f"distill.feature_loss must be one of {sorted(DEFAULT_WEIGHTS)}, got '{loss}'")
        self.pairs = pairs
        self.kind = loss
        self.projectors = nn.ModuleList(
            FeatureProjector(s.channels, t.channels) if loss == "mse" and s.channels != t.channels else nn.Identity()
            for s, t in pairs
        )
        self._student: Optional[FeatureTaps] = None
        self._teacher: Optional[FeatureTaps] = None

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        self.detach()
        self._student = FeatureTaps(student, [s.name for s, _ in self.pairs], "student")
        self._teacher = FeatureTaps(teacher, [t.name for _, t in self.pairs], "teacher")

    def detach(self) -> None:
        for taps in (self._student, self._teacher):
            if taps is not None:
                taps.remove()
        self._student = self._teacher = None

    def loss(self) -> torch.Tensor:
        assert self._student is not None and self._teacher is not None, "attach() the matcher first"
        terms = []
        for (s, t), projector in zip(self.pairs, self.projectors):
            s_map = self._student.outputs[s.name].float()
            t_map = self._teacher.outputs[t.name].float()
            if self.kind == "at":
                terms.append(attention_loss(s_map, t_map))
            else:
                terms.append(feature_loss(s_map, t_map, projector if isinstance(projector, FeatureProjector) else None))
        return torch.stack(terms).mean()

    def describe(self) -> dict[str, Any]:
        """The mapping, as printed and saved in the run (feature_map.json)."""
        rows = []
        for (s, t), projector in zip(self.pairs, self.projectors):
            rows.append(
                {
                    "student": asdict(s),
                    "teacher": asdict(t),
                    "projection": (
                        f"conv1x1+bn {s.channels}->{t.channels}" if isinstance(projector, FeatureProjector) else "none"
                    ),
                }
            )
        return {"loss": self.kind, "pairs": rows}


def mapping_lines(description: dict[str, Any]) -> list[str]:
    return [
        f"{p['student']['name']} ({p['student']['channels']}ch {p['student']['height']}x{p['student']['width']}) -> "
        f"{p['teacher']['name']} ({p['teacher']['channels']}ch {p['teacher']['height']}x{p['teacher']['width']}), "
        f"projection: {p['projection']}"
        for p in description["pairs"]
    ]
