"""A run as a notebook holds it: :class:`Run`, its metrics and model, and the stages that take a run.

``pipeline.Run`` opens a finished run (trained, fine-tuned, or a search's refit) from its folder, its id or a
unique prefix of its id (looked for where ``featcache`` looks, :func:`pipeline.cache.locate.resolve_run`),
or from what a stage returned, so a notebook goes on from a result without copying paths::

    run = pipeline.Run(pipeline.train(cfg))           # or Run(pipeline.search(cfg)): the refit run
    run.metrics.test_accuracy
    run.predict(["new/cat.jpg"], top_k=3)[0].top       # [(class index, name, probability), ...]
    tuned = run.finetune(epochs=1)                      # another Run
    tuned.export("keras")

An entry point, not a stage: it composes ``predict``, ``finetune`` and ``export``, which never import each other.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.utils.config import Config, resolve_config
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.runs import RunMetrics, read_metrics, verify_run


def _result_path(result: Any) -> Path | None:
    """The run folder a stage's result names: ``train``'s and ``finetune``'s run, a search's refit run."""
    if hasattr(result, "refit_dir"):  # a search
        if result.refit_dir is None:
            raise FeatcacheError(
                f"search {result.dir.name} trained no run (search.refit = false, or no trial succeeded):"
                f" featcache train --config {result.best_toml}"
            )
        return Path(result.refit_dir)
    run_dir = getattr(result, "run_dir", None)
    return Path(run_dir) if run_dir is not None else None


class Run:
    """A finished run: ``path``, typed ``metrics`` (:class:`pipeline.utils.runs.RunMetrics`), ``model``,
    and :meth:`predict`, :meth:`finetune`, :meth:`export`.

    ``run`` is a run folder, a run id or a unique id prefix, a stage's result, or None for the newest
    finished run of the cache ``config`` selects (as ``featcache finetune`` picks one). ``config`` (a
    :class:`Config`, a TOML path or None) with keywords on top, as every stage takes them
    (:func:`pipeline.utils.config.resolve_config`: ``cache=``, ``trust_pickle=``, ``train__runs_dir=``...),
    says where runs are looked for and carries the settings the methods use.
    """

    def __init__(self, run: Any = None, config: Config | str | Path | None = None, **overrides: Any):
        from pipeline.cache.locate import resolve_run

        self.config = resolve_config(config, "predict", **overrides)
        path = run if isinstance(run, (str, Path)) or run is None else _result_path(run)
        if path is None and run is not None:
            raise TypeError(f"Run() takes a run folder, id or stage result, not {type(run).__name__}")
        self.path: Path = resolve_run(self.config, path)
        verify_run(self.path)  # finished and intact, before anything is read
        self.metrics: RunMetrics = read_metrics(self.path)

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def kind(self) -> str:
        """``train`` (a stage-2 run, a search's refit included) or ``finetune``."""
        return self.metrics.kind

    @property
    def class_names(self) -> list[str]:
        return self.metrics.class_names

    @cached_property
    def model(self):
        """The fitted scikit-learn Pipeline (transforms + head) of a stage-2 run; the end-to-end Keras model
        of a fine-tuned one. Loaded on first use, after the manifest check."""
        if self.kind == "finetune":
            from pipeline.model.runners import load_keras

            return load_keras(self.path / "model.keras")
        from pipeline.heads.persist import load_model

        return load_model(self.path, trust_pickle=self.config.security.trust_pickle)

    def predict(self, images: str | Path | list[str | Path], top_k: int = 5, *, batch_size: int = 32):
        """Top-``top_k`` classes of image files (or folders of them): one
        :class:`pipeline.stages.predict.ImageResult` per image, ``.top`` = [(index, name, probability)]."""
        from pipeline.stages.predict import predict

        items = [images] if isinstance(images, (str, Path)) else list(images)
        _, results = predict(
            self.path, [str(p) for p in items], self.config, top_k=top_k, batch_size=batch_size
        )
        return results

    def finetune(self, config: Config | str | Path | None = None, **keys: Any) -> Run:
        """Fine-tune this stage-2 run end to end (``featcache finetune --run``); the fine-tuned :class:`Run`.

        ``keys`` are ``[finetune]`` keys (``epochs=1``, ``unfreeze="top:10"``, ``learning_rate=1e-5``) or
        any other keyword a stage takes, on top of ``config`` (default: this run's config)."""
        from pipeline.stages.finetune import finetune

        cfg = resolve_config(self.config if config is None else config, "finetune", **keys)
        return Run(finetune(cfg, run=self.path), cfg)

    def export(self, formats: str | list[str] | None = None, out: str | Path | None = None, **options: Any):
        """Export this run as an end-to-end model (``featcache export``): ``keras``, ``savedmodel``,
        ``tflite``... (default: every format), checked against the run; the report ``export.json`` holds."""
        from pipeline.stages.export import export

        return export(self.path, formats, out, self.config, **options)

    def __repr__(self) -> str:
        m = self.metrics
        key = m.score_key  # a multi-label run is scored by macro mAP
        scores = "".join(
            f", {split}_{key}={v:.4f}"
            for split in ("val", "test")
            if isinstance(v := m.split(split).get(key), float)
        )
        return f"Run({self.id!r}, kind={self.kind!r}, head={m.head!r}{scores})"


def compare(config: Config | str | Path | None = None, **options: Any):
    """``featcache compare``: every candidate backbone extracted once and scored by one linear probe
    (:func:`pipeline.stages.compare.compare`, handed the extract stage, which it may not import)."""
    from pipeline.stages.compare import compare as compare_stage
    from pipeline.stages.extract import extract

    return compare_stage(config, extractor=extract, **options)


def text_embeddings(
    prompts: list[str] | str,
    backbone: str,
    *,
    weights: str = "imagenet",
    cache_dir: str | Path | None = "cache",
    normalize: bool = False,
):
    """The joint-space text embeddings of ``prompts`` (N × D numpy) by the text tower of ``backbone`` (a
    KerasHub CLIP or SigLIP preset: ``hub:<preset>``, a handle or a folder), as the zero-shot head embeds
    them; each prompt is embedded once, ever, and kept under ``<cache_dir>/text/`` (None: not kept).
    ``normalize``: each row divided by its L2 norm, ready for cosine similarity with a ``pooled`` cache."""
    from pipeline.cache.fingerprint import weights_digest
    from pipeline.features.backbones.registry import get_spec
    from pipeline.features.text import embed_prompts, text_tower
    from pipeline.heads.zeroshot import normalize_rows

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    digest = weights_digest(get_spec(backbone), weights, ["output"], cache_dir or ".")
    tower = text_tower(backbone, weights, digest)
    emb = embed_prompts(tower, prompts, Path(cache_dir).resolve() if cache_dir is not None else None)
    return normalize_rows(emb).astype("float32") if normalize else emb
