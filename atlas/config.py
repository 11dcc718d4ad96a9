"""Every knob of an atlas build in one frozen dataclass, and its presets.

A preset is just an instance of `Config`; the command line starts from a
preset and replaces the fields the user set. Nothing else configures Atlas.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from atlas.errors import AtlasError
from atlas.store.schema import ALL_METHODS, METHODS, VIEWS

# The quick preset leaves out the costliest methods per image: the IG baselines other than
# black (several draws each) and Extremal Perturbations (hundreds of optimizer steps).
QUICK_METHODS = tuple(m for m in ALL_METHODS if not METHODS[m].costly)

PRECISIONS = ("float32", "bfloat16")  # of an attribution method's model passes (`Attribution.precision`)
MAX_SITE_MB = 1000.0  # the site's size budget: GitHub Pages publishes sites of up to 1 GB


@dataclass(frozen=True)
class Config:
    # --- what to build ---
    model: str = "efficientnet_lite0"  # model spec: torchvision name, timm:NAME, or the embedded default
    weights: str | None = None  # local state dict replacing the spec's default weights
    layers: tuple[str, ...] = ()  # glob patterns over layer names; empty = the family's default selection
    data: str | None = None  # image folder or list file; None = the embedded sample photos
    labels: str | None = None  # ground-truth file for a flat folder (ImageNet's devkit file, or "name label" lines)
    preset: str = "quick"  # name of the preset these values started from (recorded, not used)

    # --- where ---
    store_dir: Path = Path("atlas-data")  # one <model>.h5 (and its parts folder) per model
    site_dir: Path = Path("site")  # rendered static site
    device: str = "auto"  # auto | cpu | cuda | mps

    # --- feature visualization ---
    fv_size: int = 128  # rendered image side in pixels (Lucid: 128)
    fv_steps: int = 512  # optimizer steps per image (Lucid: 512)
    fv_lr: float = 0.05  # Adam learning rate (Lucid: 0.05)
    fv_batch: int = 32  # images optimized together; a work unit is one batch of one layer
    fv_loss_points: int = 32  # loss-curve samples kept per image
    fv_views: tuple[str, ...] = VIEWS  # what to render per unit
    fv_diversity: int = 4  # images in a unit's diversity set
    fv_diversity_weight: float = 100.0  # weight of the style-difference reward (Lucid's 1e2)
    fv_redirect_steps: int = 16  # first steps with the redirected ReLU gradient (Lucid: 16)
    fv_upsample: bool = True  # the model sees each image resized up to its input size (Lucent: to 224 px)
    fv_coarse_steps: int = 0  # of fv_steps, the first ones the model sees the frame at its own side (coarse to fine)
    fv_plateau: float = 0.01  # an image stops once the gain projected over its steps left is below this share (0: never)
    fv_directions: bool = True  # also render each neuron group of the building blocks (after attribution)
    fv_facets: bool = True  # also render each facet of every polysemantic unit (after the dataset stage)
    fv_param: str = "fourier"  # "fourier" (Lucid) or "phase" (MACO as horama: phases, natural magnitude, crops)
    fv_caricatures: int = 4  # explained images per layer re-optimized to exaggerate what it sees (0: none)
    fv_caricature_steps: int = 512  # their Adam steps, from the photo at the model's input side (Lucid: 512)
    fv_caricature_lr: float = 0.05  # their Adam learning rate (Lucid: 0.05; more moves a photo into noise)

    # --- activation atlas (Carter et al. 2019), rendered with the feature-visualization settings ---
    atlas_layers: int = 1  # deepest selected layers with a spatial map given an activation atlas (0: none)
    atlas_grid: int = 20  # cells per side of its grid over the 2-D layout (the paper's figures: 20 to 80)
    atlas_points: int = 50_000  # activation vectors laid out at most: every position of each explained
    # image while they fit, else a random few per image (the paper: one of each of a million images)

    # --- dataset examples ---
    topk: int = 10  # top and bottom images kept per channel (Microscope, NetDissect: about 10)
    data_batch: int = 32  # images per forward pass
    data_unit: int = 256  # images per work unit (the grain of resume and sharding)
    workers: int | None = None  # DataLoader decoding processes; None: the machine's cores; 0: the main process
    max_images: int | None = None  # use only the first N images of the source
    fuse: bool = True  # fuse the pass's per-layer reductions with torch.compile (eager fallback)
    explain: int = 1000  # images of the search set that get attributions, checks and a page (all if fewer)
    crop_size: int = 96  # side of a stored example crop, pixels (the site shows them at 96 CSS px)
    label_pool: int = 50  # top images per unit that its label and facets are drawn from (more than the k shown)

    # --- attribution ---
    attr_methods: tuple[str, ...] = ALL_METHODS  # methods computed for every dataset image
    attr_batch: int = 8  # images handed to a method at once
    attr_chunk: int = 0  # model evaluations per pass (path points, noise draws); 0: 10 on a CPU, 64 on a GPU; halved on OOM
    attr_steps: int = 50  # Integrated Gradients path points of a fixed rule (IG paper: 20-300)
    attr_max_steps: int = 400  # path points the completeness check may grow to
    attr_ig_rule: str = "adaptive"  # IG points: "adaptive" (nested, refined per path to the tolerance) or a fixed rule ("gauss_legendre", ...)
    attr_tolerance: float = 0.01  # completeness target: relative error below 1 %
    attr_samples: int = 50  # SmoothGrad noise draws and Expected Gradients samples (paper: 50)
    attr_noise: float = 0.15  # SmoothGrad noise, fraction of the input range (paper: 0.10-0.20)
    attr_smoothgrad_adaptive: bool = True  # SmoothGrad draws antithetic pairs until as accurate as attr_samples plain draws (at most twice as many)
    attr_smoothgrad_precision: str = "float32"  # of SmoothGrad's noisy gradients: or "bfloat16" (autocast; several times faster on AMX CPUs and recent GPUs)
    attr_draws: int = 4  # random IG baselines (uniform, Gaussian) averaged per image
    attr_extremal_steps: int = 800  # Extremal Perturbations optimizer steps (paper: 800)
    attr_occlusion_stride: float = 0.5  # occlusion stride as a fraction of the patch (side / 8)
    attr_unit_topk: int = 3  # top dataset images per unit given a unit attribution (0: none)
    attr_unit_size: int = 64  # side of a stored unit-attribution map (over the example's crop box)
    attr_check_images: int = 8  # dataset images the sanity checks run on
    attr_check_groups: int = 8  # parameter groups of the randomization test, from the logits down
    attr_check_points: int = 21  # points of each deletion / insertion curve
    attr_blocks_units: int = 8  # building blocks: strongest units kept per image and layer (0: no building blocks)
    attr_blocks_nmf_layers: int = 1  # deepest spatial layers whose activation is factorized into neuron groups
    attr_blocks_groups: int = 4  # neuron groups per image (Building Blocks of Interpretability: a handful)
    attr_blocks_nmf_iter: int = 200  # NMF iterations at most (scikit-learn's default)

    seed: int = 0  # root of every per-unit seed

    def replace(self, **changes) -> Config:
        """Returns a copy with `changes` applied; unknown names are an error."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise AtlasError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self, public: bool = False) -> dict:
        """The config as JSON-able values (paths as text).

        Args:
            public: paths reduced to their last part, the form stored with every store
                (which the site publishes): no folder of the user's machine is named.
        """
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}
        if public:
            out.update({k: Path(out[k]).name for k in _PATH_FIELDS if out[k] is not None})
        return out

    def stage_params(self, stage: str) -> dict:
        """The fields that change a stage's results (resume must match them)."""
        prefix = {"featurevis": "fv_", "attribution": "attr_"}.get(stage)
        common = {"model": self.model, "weights": self.weights, "seed": self.seed}
        if stage == "dataset":
            return {**common, "data": self.data, "labels": self.labels, "topk": self.topk,
                    "data_unit": self.data_unit, "max_images": self.max_images, "explain": self.explain,
                    "crop_size": self.crop_size, "label_pool": self.label_pool}
        picked = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if prefix and f.name.startswith(prefix) and f.name not in _UNIT_GRAIN}
        return {**common, **picked}


_PATH_FIELDS = ("weights", "data", "labels", "store_dir", "site_dir")  # what `to_dict(public=True)` shortens

# Fields that decide how work is cut or which units exist, not what a unit holds.
_UNIT_GRAIN = ("fv_batch", "attr_batch", "attr_chunk", "attr_methods", "fv_views", "fv_directions", "fv_facets")

# The full preset is the reference recipe; the quick one renders every selected
# layer of the default model on a 2-core CPU in a few minutes: smaller images
# and far fewer optimizer steps, so its visualizations are rougher; the model sees
# them at their own 56 px, not resized up to its input size (16 times the pixels).
PRESETS: dict[str, Config] = {
    "full": Config(preset="full"),
    "quick": Config(preset="quick", explain=32, crop_size=64, fv_size=56, fv_steps=20, fv_lr=0.1, fv_batch=64,
                    fv_loss_points=16, fv_views=("channel",), fv_directions=False, fv_facets=False, fv_redirect_steps=6,
                    fv_upsample=False,
                    # at most 64 cells to render, and UMAP's exact neighbours (under 4,096 points) over every
                    # position of the default model's 32 images (1,568): the activation atlas adds about a minute
                    atlas_grid=8, atlas_points=2000,
                    # 4 caricatures of 16 steps on each of the default model's 18 layers: about 67 s of one
                    # core (20 steps: 85 s, and a gain in objective of x1.16 at the median instead of x1.14)
                    fv_caricature_steps=16,
                    attr_methods=QUICK_METHODS, attr_steps=32, attr_max_steps=32, attr_samples=16,
                    attr_draws=2, attr_occlusion_stride=1.0, attr_unit_topk=1, attr_check_images=2,
                    attr_check_groups=3, attr_check_points=11),
}


def preset(name: str) -> Config:
    """Returns the preset called `name`."""
    try:
        return PRESETS[name]
    except KeyError:
        raise AtlasError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
