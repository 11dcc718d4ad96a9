"""Every recipe behind the atlas's pictures, with its reference and where Atlas chooses differently.

The about page lists them, so a reader can tell what each picture is before
trusting it. Each entry names the paper, the implementation Atlas is held
against (a test or `atlas bench` compares them), and Atlas's own choices.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    what: str  # the view, list or method
    reference: str  # the paper
    held_against: str  # the implementation a test or benchmark compares with ("" for none yet)
    atlas: str  # what Atlas does, and where it differs from the reference


RECIPES = (
    Recipe("feature visualization (channel, neuron views)",
           "Olah, Mordvintsev, Schubert, Feature Visualization, Distill 2017 (the Lucid recipe)",
           "Lucent 0.1.8 (atlas bench featurevis)",
           "Fourier parameterization with 1/f scaling, decorrelated colour, sigmoid; Lucid's transforms (pad 12, "
           "crop 8, scale 0.9-1.1, rotation from Lucid's list, crop 4) composed into one warp per image; Adam "
           "lr 0.05; redirected ReLU for the first 16 steps. Each image draws its own transforms (Lucid: one "
           "scale per batch), so the view keeps its scale-1 side. The model sees each transformed frame resized "
           "up to its input size (224 px for most), as Lucent feeds it, so a unit is driven at the scale of "
           "the photos it learned from (the quick preset: the frame as it is)."),
    Recipe("negative view", "Lucid: the channel minimized on the pre-ReLU tensor", "",
           "minimizes the unit's pre-activation where its output is an activation's (so a unit silent on the "
           "start image still moves), the unit itself otherwise."),
    Recipe("diversity view", "Olah et al. 2017: minus the cosine similarity of Gram matrices, weight 1e2", "",
           "Lucid's term at Lucid's weight: the channel plus 100 times minus each image's summed Gram cosine "
           "similarity with the others of its set."),
    Recipe("phase parameterization (fv_param=phase)",
           "Fel et al., Unlocking Feature Visualization for Deep Networks with MAgnitude Constrained "
           "Optimization (MACO), NeurIPS 2023", "horama 0.3.0, its authors' PyTorch MACO (tests)",
           "MACO as horama: only the Fourier phases are optimized (standardized, NAdam lr 1.0), the magnitude is "
           "the mean spectrum of natural photos in decorrelated colour (the embedded photos': horama downloads "
           "ImageNet's), the image standardized, its colours recorrelated, a sigmoid spanning -2.5..2.5 in ImageNet's "
           "normalized input space (pixels from -0.16 to 1.06, clipped when stored); six random crops a step "
           "(0.25-0.30 of the side, centres N(0.5, 0.15)) with noise 0.05. The canvas is 1280/224 of the model's "
           "view, as horama's, stored at the view size; the picture is faded by the transparency map (the "
           "gradient's magnitude summed over the steps). Crops and noise come from one generator per image."),
    Recipe("top dataset examples", "Microscope; NetDissect (Bau et al. 2017): the top images by spatial max",
           "a brute-force pass (tests)",
           "one streaming pass; ranked by the spatial max, of the pre-activation where the unit's output is an "
           "activation's (the activation's own order, ties at 0 or at a cap told apart), shown with the "
           "activation there; ties by the lower image index; the crop is the receptive field around that place."),
    Recipe("bottom dataset examples", "the images that suppress the unit most", "a brute-force pass (tests)",
           "ranked by the spatial min of the pre-activation (of the unit itself where it has none), cropped "
           "around that place; never dataset order."),
    Recipe("gradient, gradient x input", "Simonyan et al. 2014; Shrikumar et al. 2016", "Captum (tests)",
           "the target logit's gradient, and its product with the input."),
    Recipe("SmoothGrad, SmoothGrad squared, VarGrad", "Smilkov et al. 2017; Hooker et al. 2019; Adebayo et al. 2018",
           "Captum's NoiseTunnel (tests, atlas bench attribution)",
           "noise 15 % of the input range; the three share one set of noisy gradients."),
    Recipe("Guided Backprop, Guided Grad-CAM", "Springenberg et al. 2015; Selvaraju et al. 2017",
           "Captum (tests)", "module, functional and in-place ReLUs and ReLU6 intercepted."),
    Recipe("Grad-CAM", "Selvaraju et al. 2017", "Captum's LayerGradCam (tests)",
           "the last spatial feature map of the network, upsampled bilinearly."),
    Recipe("Integrated Gradients and its baselines, Expected Gradients",
           "Sundararajan et al. 2017; Sturmfels et al., Distill 2020; Erion et al. 2021",
           "Captum (tests, atlas bench attribution)",
           "Gauss-Legendre points, raised until the completeness error is within tolerance."),
    Recipe("LRP (EpsilonPlusFlat, EpsilonGammaBox)",
           "Bach et al. 2015; Montavon et al. 2019; Kohlbrenner et al., Towards Best Practice in Explaining "
           "Neural Network Decisions with LRP, IJCNN 2020", "zennit 0.5 (its rules and composites; tests)",
           "zennit's two composites (ε 1e-6 on dense layers; z+ or γ 0.25 on convolutions; flat or bounded z^B "
           "first layer) on a canonized copy: zennit's canonizers for torchvision ResNets and VGGs, otherwise "
           "torch.fx turns each residual sum into zennit's Sum and folds every BatchNorm after a convolution "
           "(timm's BatchNormAct2d too) and makes functional ReLUs modules. Biases take no relevance; a "
           "convolution unit that fires on its bias alone, which zennit's z+ drops, hands its relevance to its "
           "receptive field by the flat rule, so the map sums to the logit; the conservation error is shown like "
           "completeness."),
    Recipe("occlusion", "Zeiler and Fergus 2014", "Captum's Occlusion (tests)",
           "a patch an eighth of the side, stride half a patch, filled with the normalization mean."),
    Recipe("Extremal Perturbations", "Fong, Patrick, Vedaldi, ICCV 2019", "torchray 1.0.0.2 (tests)",
           "the paper's recipe: smooth-max-of-bumps masks (step 7 px, sigma 21 px), an 8-level blur pyramid up "
           "to 20 px, SGD lr 0.01 momentum 0.9 for 800 steps, the area weight from 300 up by x1.0035 a step, a "
           "left-right flip every other step; 10 % of the image. The area counts over the image (torchray also "
           "counts a margin around it, which keeps about 0.15 of the image for 0.1; counted as torchray does, "
           "the mask is torchray's to the last bit); sizes scale with the input side / 224. Each image's area "
           "and kept logit are shown."),
    Recipe("model-parameter randomization", "Adebayo et al., Sanity Checks for Saliency Maps, NeurIPS 2018",
           "",
           "cascading from the logits and one group at a time; BatchNorm reset whole (running statistics too, as "
           "freshly built and as Quantus resets it); Spearman of absolute and signed maps, SSIM."),
    Recipe("random-logit test", "Sixt et al. 2020", "", "the map for a random other class."),
    Recipe("deletion and insertion", "Petsiuk et al., RISE, BMVC 2018", "",
           "pixels ordered by the colour-summed signed map, or by its magnitude where the sign is no evidence "
           "(gradient, SmoothGrad, Guided Backprop, Guided Grad-CAM); mean and blur replacement; the curves in "
           "class probability, as RISE reports them."),
    Recipe("circuits by attribution (unit pages)", "Olah et al., Zoom In: An Introduction to Circuits, Distill 2020",
           "autograd on a hand-set model (tests)",
           "a unit's input from each channel of the previous selected layer: activation x gradient of the "
           "unit's spatial maximum, summed over positions, averaged over its top images, in the same backward "
           "pass as its pixel attribution; works through residual sums and concatenations. Outputs are the "
           "transpose: the unit's column in the next layer's inputs."),
    Recipe("circuits by weights (kernel slices)", "Voss et al., Visualizing Weights, Distill 2021",
           "the convolution's weights (tests)",
           "where one ungrouped convolution connects the two layers (only normalization and activation after "
           "it): the kernel slice W[c, j], scaled by the BatchNorm's gamma / sqrt(var + eps), so its sign is "
           "what the network passes on."),
    Recipe("building blocks (image pages)", "Olah et al., The Building Blocks of Interpretability, Distill 2018",
           "autograd on hand-set models (tests)",
           "each selected layer's units ranked by activation x gradient of the top-1 logit, summed over "
           "positions (one backward pass per batch for every layer), as a share of the logit; the deepest "
           "layer's activation clipped at 0 and factorized by scikit-learn's NMF (nndsvda, seeded) into 4 "
           "neuron groups; in the full preset each group's direction (its channel weights) rendered with the "
           "stage's feature-visualization recipe."),
    Recipe("comparisons (atlas compare)", "Kornblith et al., Similarity of Neural Network Representations "
           "Revisited, ICML 2019 (linear CKA)", "a permuted copy of a model and the model itself (tests)",
           "linear CKA of every unit's spatial mean on the explained images both stores hold; each unit "
           "matched to the best-correlated unit (Pearson r) of the most similar layer, a counterpart only "
           "above r = 0.5 and above the layer's chance level (the 99th percentile of best r with the images "
           "shuffled)."),
)


def rows() -> list[dict]:
    """The recipes as the about page's table rows."""
    return [{"what": r.what, "reference": r.reference, "held_against": r.held_against or "-", "atlas": r.atlas}
            for r in RECIPES]
