"""Every name the store is made of, defined once: format, stages, groups, views and methods.

The stages write these names, the site and `atlas info` read them, and the
synthetic stores of the tests and benchmarks are built from them, so a name
changed here changes everywhere. docs/store.md describes the layout they make:

    /                           attrs: spec, name, weights_id, input_size, config, versions, ...
    /classes                    class names
    /layers/<layer>/            attrs: kind, module, call, channels, height, width, order
        featurevis/<view>[_objective|_loss|_seed|_peak|_done], quality
        caricatures/            index, images, objective_start, objective_end, loss, finite
        activation_atlas/       xy, image, position, cell (per point); row, col, count, direction, images,
                                objective, done, class, class_score, units, unit_weight (per cell)
        topk/, bottomk/         index, value, box, crops
        stats/                  mean, std, max, zero_fraction, dead, hist, hist_edges
        means                   spatial mean of every channel on each explained image
        unit_attribution/       maps, scale, index
        labels/                 examples, label, concept, count, p, lift, drawn; facet_* (member, label, ...)
        facets/                 channel, facet, images, objective, alignment, done (polysemantic units)
    /dataset/                   paths, labels, top5, top5_prob, skipped_*, source_index (the search set);
                                explained, images (the explained set); concepts (what unit labels number)
    /attribution/<method>/      maps, label_maps, targets, info (rows of the explained set)
    /attribution/skipped        methods that do not apply to the model, and why
    /checks/<method>/           randomization, deletion, insertion, ...
    /blocks/                    target, logit, units, contribution, total; nmf/<layer>/ (rows of the explained set)
"""

from __future__ import annotations

from dataclasses import dataclass

STORE_FORMAT = 5  # bumped whenever the store layout or its encoding changes incompatibly

# --- groups of the consolidated store ---
CLASSES = "classes"
LAYERS = "layers"
DATASET = "dataset"  # also the dataset stage's name: its parts folder
ATTRIBUTION = "attribution"  # also the attribution stage's name
CHECKS = "checks"
DIRECTIONS = "directions"  # /directions/<layer>/: feature visualizations of the neuron groups' directions
BLOCKS = "blocks"  # image building blocks; also the prefix of their attribution work units
# inside /layers/<layer>/
FEATUREVIS = "featurevis"  # also the feature-visualization stage's name
TOPK = "topk"
BOTTOMK = "bottomk"
STATS = "stats"
MEANS = "means"  # /layers/<layer>/means: each explained image's spatial mean of every channel (for comparisons)
UNIT_ATTRIBUTION = "unit_attribution"
CIRCUITS = "circuits"  # /layers/<layer>/circuits/: inputs (by attribution) and kernel (by weights)
# /layers/<layer>/caricatures/: explained images re-optimized to exaggerate what the layer sees in them;
# also the prefix of their featurevis work units
CARICATURES = "caricatures"
# /layers/<layer>/activation_atlas/: the explained images' activations laid out in 2-D, binned into cells,
# each cell's mean direction visualized; also the prefix of its featurevis work units
ACTIVATION_ATLAS = "activation_atlas"
LABELS = "labels"  # /layers/<layer>/labels/: each unit's label, its evidence and its facets
FACETS = "facets"  # /layers/<layer>/facets/: faceted feature visualizations of the polysemantic units
CONCEPTS = "concepts"  # /dataset/concepts: what labels number (the classes, then their coarse groups)
CONCEPT_GROUPS = "concept_groups"  # /dataset/concept_groups: each class's group concept (-1: none)

# Root attributes stored as JSON (decoded by read_attrs); the others are plain HDF5 scalars.
# The stages, in pipeline order; each is a package of the same name with run(ctx) and consolidate(store, h5).
STAGES = (FEATUREVIS, DATASET, ATTRIBUTION)

ROOT_SCALARS = ("spec", "name", "weights_id", "input_size", "atlas_version", "store_format", "created")
ROOT_JSON = ("config", "versions", "preprocess")
LAYER_ATTRS = ("kind", "module", "call", "channels", "height", "width", "pre")  # pre: "" for none

# --- feature-visualization views, in display order ---
VIEWS = ("channel", "negative", "neuron", "diversity")
SECONDARY_VIEWS = VIEWS[1:]  # shown together in one strip on a unit's page
# A view's datasets in /layers/<layer>/featurevis/: the part's array name -> the suffix after the view's name.
VIEW_ARRAYS = {"images": "", "objective": "_objective", "loss": "_loss", "seed": "_seed", "peak": "_peak",
               "finite": "_done", "alpha": "_alpha", "steps": "_steps"}  # alpha: MACO's transparency, only in its renders


def view_dataset(view: str, array: str) -> str:
    """The name of one of a view's datasets, e.g. ("channel", "finite") -> "channel_done"."""
    return view + VIEW_ARRAYS[array]


# --- attribution methods ---
@dataclass(frozen=True)
class Method:
    """What the store, the site and the stage know of an attribution method.

    Attributes:
        name: the method's key in the store and on the command line.
        family: the group the image and checks pages show it in.
        signed: its maps carry a sign (evidence for and against); False: non-negative maps.
        magnitude: only the map's magnitude is evidence: a gradient's sign says which way a pixel
            would have to move, not whether the pixel helps, so deletion and insertion rank its pixels
            by |map| (summed over colour) instead of by the signed map.
        path: a path method, whose map sums to f(x) - f(baseline) (completeness is checked).
        costly: among the methods costing the most model passes per image (the quick preset leaves them out).
    """

    name: str
    family: str
    signed: bool = True
    magnitude: bool = False
    path: bool = False
    costly: bool = False


_METHODS = (
    Method("gradient", "Gradients", magnitude=True),
    Method("gradient_x_input", "Gradients"),
    Method("smoothgrad", "SmoothGrad family", magnitude=True),
    Method("smoothgrad_sq", "SmoothGrad family", signed=False),
    Method("vargrad", "SmoothGrad family", signed=False),
    Method("guided_backprop", "Guided", magnitude=True),
    Method("grad_cam", "CAM", signed=False),  # the ReLU keeps only positive evidence
    Method("guided_grad_cam", "Guided", magnitude=True),  # Guided Backprop's sign, scaled by the CAM
    # vision transformers only (skipped elsewhere): the class token's share of each patch; no class enters it
    Method("attention_rollout", "Attention", signed=False),
    Method("integrated_gradients", "Path methods", path=True),
    # the IG baselines other than black take several draws each
    Method("ig_max_distance", "Path methods", path=True, costly=True),
    Method("ig_blurred", "Path methods", path=True, costly=True),
    Method("ig_uniform", "Path methods", path=True, costly=True),
    Method("ig_gaussian", "Path methods", path=True, costly=True),
    Method("expected_gradients", "Path methods", path=True),
    # relevance conserved from the logit to the pixels: the map sums to f(x) (checked like completeness)
    Method("lrp_epsilon_plus_flat", "LRP"),
    Method("lrp_epsilon_gamma_box", "LRP"),
    Method("occlusion", "Perturbation"),
    Method("extremal_perturbation", "Perturbation", signed=False, costly=True),  # a mask in [0, 1]; 800 steps
)
METHODS: dict[str, Method] = {m.name: m for m in _METHODS}  # in the order the pipeline computes them
ALL_METHODS = tuple(METHODS)
FAMILY_ORDER = ("Gradients", "SmoothGrad family", "Guided", "CAM", "Attention", "Path methods", "LRP", "Perturbation")
FAMILIES = tuple((family, tuple(m.name for m in _METHODS if m.family == family)) for family in FAMILY_ORDER)
RANDOM_CONTROL = "random"  # the checks' random-order control, stored beside the methods' checks
