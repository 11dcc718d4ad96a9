"""The `atlas` command line: parse options, build one Config, call one function."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from atlas.config import MAX_SITE_MB, PRECISIONS, PRESETS, Config, preset
from atlas.errors import AtlasError


class AtlasGroup(click.Group):
    """Turns AtlasError and Ctrl-C into one line and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AtlasError as exc:
            click.echo(f"atlas: error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("\natlas: interrupted; finished work units are kept, re-run the same command "
                       "to continue", err=True)
            sys.exit(130)
        finally:
            if "atlas.distributed" in sys.modules:  # a torchrun build joined a process group: leave it
                sys.modules["atlas.distributed"].stop()


@click.group(cls=AtlasGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="atlas-microscope")
def main() -> None:
    """Atlas: static model atlases for PyTorch vision models."""


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p.strip() for v in values for p in v.split(",") if p.strip())


def build_options(f):
    """The options shared by `build` and the single-stage commands."""
    options = [
        click.option("--model", "-m", default=Config.model, show_default=True,
                     help="torchvision name, timm:NAME, efficientnet_lite0 or atlas:NAME"),
        click.option("--weights", type=click.Path(), help="local state dict replacing the default weights"),
        click.option("--layers", "-l", multiple=True, help="glob pattern(s) over layer names, comma-separated "
                     "or repeated (default: the model family's significant layers)"),
        click.option("--data", "-d", type=click.Path(), help="image folder or list file "
                     "(default: the embedded sample photos)"),
        click.option("--labels", type=click.Path(), help="ground truth of a flat folder: ImageNet's devkit file "
                     "(one class number per line, in file-name order) or lines of 'file label'"),
        click.option("--explain", type=int, help="images that get attributions, checks and a page of their own "
                     "(default: the preset's; every image when the source has fewer)"),
        click.option("--crop-size", type=int, help="side in pixels of each stored dataset-example crop"),
        click.option("--atlas-layers", type=int, help="deepest layers given an activation atlas (0: none)"),
        click.option("--preset", "-p", type=click.Choice(sorted(PRESETS)), default=Config.preset,
                     show_default=True),
        click.option("--device", default=Config.device, show_default=True, help="auto, cpu, cuda, cuda:N or mps"),
        click.option("--store-dir", type=click.Path(), default=str(Config.store_dir), show_default=True),
        click.option("--out", "-o", type=click.Path(), default=str(Config.site_dir), show_default=True,
                     help="site folder"),
        click.option("--steps", type=int, help="feature-visualization steps (overrides the preset)"),
        click.option("--size", type=int, help="feature-visualization image size (overrides the preset)"),
        click.option("--fv-batch", type=int, help="channels rendered together (one work unit)"),
        click.option("--topk", type=int, help="top and bottom images kept per channel"),
        click.option("--max-images", type=int, help="use only the first N images"),
        click.option("--data-unit", type=int, help="images per dataset work unit (the grain of resume and of "
                     "sharing the images among torchrun ranks)"),
        click.option("--workers", type=int, help="image-decoding processes (default: the machine's cores; "
                     "0: decode in the main process)"),
        click.option("--methods", multiple=True, help="attribution methods, comma-separated"),
        click.option("--smoothgrad-precision", type=click.Choice(PRECISIONS),
                     help="precision of SmoothGrad's noisy gradients (bfloat16: autocast, several times faster "
                     "on CPUs with AMX and on recent GPUs; default float32)"),
        click.option("--quiet", "-q", is_flag=True, help="no progress bars"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def make_config(o: dict) -> Config:
    """One Config from the preset and the options the user set."""
    changes = {"model": o["model"], "weights": o["weights"], "layers": _split(o["layers"]),
               "data": o["data"], "labels": o["labels"], "device": o["device"], "store_dir": Path(o["store_dir"]),
               "site_dir": Path(o["out"])}
    for option, field in (("steps", "fv_steps"), ("size", "fv_size"), ("fv_batch", "fv_batch"), ("topk", "topk"),
                          ("max_images", "max_images"), ("data_unit", "data_unit"), ("workers", "workers"),
                          ("explain", "explain"), ("crop_size", "crop_size"), ("atlas_layers", "atlas_layers"),
                          ("smoothgrad_precision", "attr_smoothgrad_precision")):
        if o[option] is not None:
            changes[field] = o[option]
    if o["methods"]:
        changes["attr_methods"] = _split(o["methods"])
    for field, value in changes.items():
        least = 0 if field in ("workers", "atlas_layers") else 1
        if isinstance(value, int) and not isinstance(value, bool) and value < least:
            raise AtlasError(f"--{field.removeprefix('fv_').replace('_', '-')} must be "
                             f"{'0 or more' if least == 0 else 'positive'}, got {value}")
    return preset(o["preset"]).replace(**changes)


@main.command()
@build_options
def build(**o) -> None:
    """Run every stage (feature visualization, dataset examples, attribution) and render the site."""
    from atlas import distributed, pipeline
    config = make_config(o)
    built = pipeline.build(config, progress=not o["quiet"])
    if built.site is not None:
        _print_report(built.site, config.site_dir, quiet=o["quiet"])
    if distributed.from_env().main:
        click.echo(f"store: {built.store}\nsite:  {config.site_dir / 'index.html'}")


def _stage_command(name: str, stage: str, doc: str):
    @build_options
    def command(**o) -> None:
        from atlas import pipeline
        ctx = pipeline.prepare(make_config(o), progress=not o["quiet"])
        path = pipeline.run_stages(ctx, [stage])
        if ctx.ranks.main:
            click.echo(f"store: {path}")
    command.__doc__ = doc
    main.command(name)(command)


_stage_command("featurevis", "featurevis", "Render feature visualizations of every selected channel.")
_stage_command("dataset", "dataset", "Find every channel's top and bottom dataset images in one pass.")
_stage_command("attribute", "attribution", "Compute attributions for every dataset image.")


@main.command()
@click.argument("store", type=click.Path())
@click.option("--out", "-o", type=click.Path(), default=str(Config.site_dir), show_default=True)
@click.option("--max-site-mb", type=float, default=MAX_SITE_MB, show_default=True,
              help="warn when the whole site grows past this size (GitHub Pages: 1 GB)")
@click.option("--quiet", "-q", is_flag=True)
def render(store: str, out: str, max_site_mb: float, quiet: bool) -> None:
    """Render the static site of a consolidated STORE (.h5) into --out."""
    from atlas import site
    report = site.render(Path(store), Path(out), progress=not quiet, max_site_mb=max_site_mb)
    _print_report(report, Path(out), quiet)
    click.echo(f"site: {Path(out) / 'index.html'} ({report.get('pages', 0)} pages)")


def _print_report(report: dict, site_dir: Path, quiet: bool) -> None:
    """The site's size by part (unless quiet), and a warning on stderr when it is over its budget."""
    from atlas import site
    lines, warning = site.report_lines(report, site_dir)
    if not quiet:
        click.echo("\n".join(lines))
    if warning:
        click.echo(warning, err=True)


@main.command()
@click.argument("store_a", type=click.Path())
@click.argument("store_b", type=click.Path())
@click.option("--out", "-o", type=click.Path(), default=str(Config.site_dir), show_default=True, help="site folder")
def compare(store_a: str, store_b: str, out: str) -> None:
    """Compare two stores built on the same images: linear CKA between layers, units matched by correlation."""
    from atlas.compare import compare as run
    report = run(Path(store_a), Path(store_b), Path(out))
    click.echo(f"{report['a']} vs {report['b']} on {report['images']} images: {report['layers']} layers, "
               f"{report['unmatched']} of {report['units']} units without a counterpart ({report['seconds']:.1f} s)")
    click.echo(f"comparison: {report['index']}")


@main.command()
@click.argument("site_dir", type=click.Path(exists=True, file_okay=False), default=str(Config.site_dir))
@click.option("--mode", type=click.Choice(["gh-pages", "docs"]), default="gh-pages", show_default=True)
@click.option("--repo", type=click.Path(exists=True, file_okay=False), default=".", show_default=True)
def publish(site_dir: str, mode: str, repo: str) -> None:
    """Publish a rendered SITE_DIR for GitHub Pages: a gh-pages branch, or a docs/ folder."""
    from atlas.site.publish import publish as run
    click.echo(run(site_dir, mode, repo))


@main.command()
@click.argument("store", type=click.Path())
def info(store: str) -> None:
    """Summarize a consolidated STORE (.h5): model, layers, what each stage has done."""
    from atlas.store.info import summarize
    click.echo(summarize(Path(store)))


@main.command("models")
@click.option("--all", "show_all", is_flag=True, help="list every timm model too")
def models_cmd(show_all: bool) -> None:
    """List the models Atlas can load."""
    from atlas.models import list_models
    for source, names in list_models().items():
        shown = names if show_all or len(names) <= 100 else names[:20]
        click.echo(f"{source} ({len(names)}):")
        click.echo("  " + " ".join(shown) + ("" if len(shown) == len(names) else " ... (--all lists them)"))


@main.command("layers")
@click.argument("model")
@click.option("--weights", type=click.Path())
@click.option("--layers", "-l", multiple=True, help="show only layers matching these glob patterns")
@click.option("--selected", is_flag=True, help="show only the default selection")
def layers_cmd(model: str, weights: str | None, layers: tuple[str, ...], selected: bool) -> None:
    """List every hookable layer of MODEL: name, kind, channels, spatial size (* = default selection)."""
    from atlas import layers as L
    from atlas import models
    loaded = models.load(model, weights)
    found = L.discover(loaded.model, loaded.input_size)
    default = {l.name for l in L.default_selection(loaded.model, found)}
    shown = L.select(loaded.model, found, _split(layers)) if layers else found
    if selected:
        shown = [l for l in shown if l.name in default]
    click.echo(f"{'':2}{'layer':40} {'kind':26} {'channels':>8}  size")
    for l in shown:
        click.echo(f"{'*' if l.name in default else ' ':2}{l.name:40} {l.kind:26} {l.channels:8d}  "
                   f"{l.height}x{l.width}")
    picked = [l for l in found if l.name in default]
    click.echo(f"{len(found)} layers; default selection: {len(picked)} layers, "
               f"{sum(l.channels for l in picked)} channels")


@main.group()
def bench() -> None:
    """Side-by-side benchmarks; each prints its summary as the last line."""


def bench_options(f):
    """The model and device options every benchmark takes."""
    for option in reversed([
        click.option("--model", default="resnet50", show_default=True),
        click.option("--weights", default="random", show_default=True,
                     callback=lambda _ctx, _param, value: None if value == "default" else value,
                     help="a state dict, random, or default: the model's own (efficientnet_lite0's embedded "
                          "ImageNet weights)"),
        click.option("--device", default="cpu", show_default=True),
    ]):
        f = option(f)
    return f


def _summary(name: str, result: dict, fields: dict[str, str]) -> None:
    """Prints a benchmark's last line: `name: key=value ...`, each value in its format."""
    click.echo(f"{name}: " + " ".join(f"{k}={result[k]:{fmt}}" for k, fmt in fields.items()))


@bench.command("dataset")
@bench_options
@click.option("--images", default=128, show_default=True, help="images per pass (the memory run uses 4x)")
@click.option("--batch", default=32, show_default=True)
@click.option("--workers", default=2, show_default=True)
def bench_dataset(**o) -> None:
    """Atlas's dataset pass against a plain model(x) pass over the same images."""
    from atlas.bench import dataset
    _summary("dataset", dataset.run(**o), {"throughput_vs_plain_forward": ".3f", "peak_mem_ratio_4x_images": ".3f"})


@bench.command("featurevis")
@bench_options
@click.option("--channels", default=16, show_default=True, help="units both tools render")
@click.option("--steps", default=64, show_default=True)
@click.option("--size", default=128, show_default=True)
@click.option("--lucent-size", type=int, default=None, help="size Lucent feeds the model (default: its own, 224)")
@click.option("--upsample/--no-upsample", default=False, show_default=True,
              help="Atlas shows the model its frames resized up to its input size, as the full preset and Lucent do")
@click.option("--quality/--no-quality", default=True, show_default=True,
              help="then the time to Lucent's 512-step quality (Lucent's 512 steps take about half an hour on 2 cores)")
def bench_featurevis(**o) -> None:
    """Atlas's batched renderer against Lucent 0.1.8 on the same channels, then its time to Lucent's quality."""
    from atlas.bench import featurevis
    result = featurevis.run(**o)
    _summary("featurevis", result, {"speedup_vs_lucent": ".2f", "quality_vs_lucent": ".2f",
                                    "overhead_vs_forward_backward": ".2f"})
    if o["quality"]:
        _summary("featurevis_to_quality", {"speedup_vs_lucent": result["speedup_vs_lucent_to_quality"],
                                           "quality_at_224": result["quality_at_224"]},
                 {"speedup_vs_lucent": ".2f", "quality_at_224": ".3f"})


@bench.command("attribution")
@bench_options
@click.option("--images", default=1, show_default=True, help="images attributed together")
@click.option("--chunk", default=10, show_default=True, help="model evaluations per pass (Atlas and tuned Captum)")
@click.option("--accuracy-images", default=8, show_default=True,
              help="photos of the time-to-accuracy race of the adaptive rules (0: skip it)")
def bench_attribution(**o) -> None:
    """Integrated Gradients and SmoothGrad against Captum 0.9: speed and agreement, then time to accuracy."""
    from atlas.bench import attribution
    result = attribution.run(**o)
    _summary("attribution", result, {"ig_speedup_vs_captum": ".2f", "smoothgrad_speedup_vs_captum": ".2f",
                                     "max_rel_diff_vs_captum": ".1e"})
    if "to_accuracy" in result:
        _summary("attribution_to_accuracy", result["to_accuracy"], {
            "ig_speedup_vs_captum": ".2f", "smoothgrad_speedup_vs_captum": ".2f", "evaluations_ratio": ".2f"})


@bench.command("projection")
@bench_options
@click.option("--preset", "preset_name", default="full", show_default=True)
def bench_projection(**o) -> None:
    """Measure feature visualization per layer; project the time to render every channel."""
    from atlas.bench import projection
    _summary("projection", projection.run(**o), {"seconds_per_channel": ".1f", "total_hours": ".1f",
                                                 "channels": "d"})


@bench.command("circuits")
@click.option("--model", default="efficientnet_lite0", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--channels", default=16, show_default=True, help="first channels of each layer given unit passes")
def bench_circuits(**o) -> None:
    """Unit passes with circuit inputs against without, and `atlas compare` of trained and random weights."""
    from atlas.bench import circuits
    _summary("circuits", circuits.run(**o), {"unit_pass_overhead": ".3f", "compare_seconds": ".1f"})


@bench.command("labels")
def bench_labels() -> None:
    """Unit labels and facets of a synthetic store shaped like ResNet-50 over ImageNet's 50,000 images."""
    from atlas.bench import labels
    _summary("labels", labels.run(), {"seconds": ".1f", "peak_mem_mb": ".0f"})


@bench.command("scale")
def bench_scale() -> None:
    """One torchrun rank against two on the same build, then a kill and a resume."""
    from atlas.bench import scale
    _summary("scale", scale.run(), {"speedup_2_ranks": ".2f", "resume_lost_units": "d"})


@bench.command("site")
@click.option("--images", "n_images", default=50_000, show_default=True, help="search-set images (ImageNet val)")
@click.option("--explain", default=1000, show_default=True, help="explained images: pages, photos, maps")
@click.option("--max-layers", type=int, default=None, help="only the first N layers plus the widest (quicker)")
def bench_site(n_images: int, explain: int, max_layers: int | None) -> None:
    """Render a synthetic full ResNet-50 atlas over ImageNet; measure its size and its largest page."""
    from atlas.bench import site
    _summary("site", site.run(n_images=n_images, explained=explain, max_layers=max_layers),
             {"resnet50_site_mb": "", "largest_page_kb": "", "layer_grid_requests": ""})


@bench.command("references")
@click.option("--only", help="comma-separated pairs to run, of lucent, maco, extremal, quantus, lrp (default: all)")
@click.option("--steps", default=64, show_default=True,
              help="feature-visualization steps (Lucent and MACO pairs), the same for Atlas and the reference")
@click.option("--per-layer", default=2, show_default=True, help="MACO units per layer (three layers)")
@click.option("--lucent-units", default=4, show_default=True, help="units the Lucent pair renders")
@click.option("--size", default=128, show_default=True, help="feature-visualization side; MACO's view follows")
@click.option("--photos", default=3, show_default=True, help="photos both Extremal Perturbations explain")
@click.option("--extremal-steps", default=800, show_default=True, help="Extremal Perturbations steps (paper: 800)")
@click.option("--check-photos", default=8, show_default=True, help="photos the Quantus and LRP pairs explain")
@click.option("--device", default="cpu", show_default=True)
def bench_references(**o) -> None:
    """Each recipe against the field's reference implementation, on the default model."""
    from atlas.bench import references
    _summary("references", references.run(**o), references.SUMMARY)


@bench.command("imagenet")
@click.option("--images", type=click.IntRange(min=1), default=250, show_default=True,
              help="search images of the smaller build (the larger one searches 4x)")
@click.option("--explain", type=click.IntRange(min=1), default=8, show_default=True,
              help="images of each search set that get attributions")
@click.option("--device", default="cpu", show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="image-decoding processes (they also write the synthetic photos)")
@click.option("--keep", type=click.Path(file_okay=False), help="build in this new folder and keep the photos, "
              "stores and sites (default: a temporary folder)")
@click.option("--layers", multiple=True, hidden=True, help="glob patterns of the layers to hook (quick trials)")
@click.option("--methods", multiple=True, hidden=True, help="attribution methods (quick trials; default: the preset's)")
def bench_imagenet(**o) -> None:
    """Search N and 4N synthetic photos, explain a fixed set; time, store and site growth."""
    from atlas.bench import imagenet
    lists = {"layers": _split(o["layers"]), "methods": _split(o["methods"])}
    _summary("imagenet", imagenet.run(**{**o, **lists}), imagenet.SUMMARY)
