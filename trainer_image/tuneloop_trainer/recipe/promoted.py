"""The promoted model: reading the pointer to it, and evaluating it on this run's splits.

``promoted.json`` names the model this run is compared with (gates with ``minImprovement``).
After the candidate is written and released, the promoted model loads and runs through the very
same evaluation; a model that cannot be loaded is reported, not raised.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path

import torch

from tuneloop.api.spec import ModelSource
from tuneloop.contract import Layout, PromotedPointer
from tuneloop_trainer.data import Example
from tuneloop_trainer.data.profile import DataProfile
from tuneloop_trainer.errors import InvalidConfigError, UnsupportedModelError
from tuneloop_trainer.evaluation import PromotedEvaluation
from tuneloop_trainer.features import Feature, build_features
from tuneloop_trainer.models import TrainedModel, load_trained_model, max_input_tokens, resolve_model
from tuneloop_trainer.recipe.evaluate import EvalTarget, EvaluationSteps


class PromotedSteps(EvaluationSteps):
    """Reading ``promoted.json`` and the promoted run's data profile; evaluating its model."""

    def _read_promoted_pointer(self) -> PromotedPointer | None:
        """``promoted.json`` under the output (written by the operator, or by hand for local
        runs): the model this run is compared with. ``None`` when nothing is promoted."""
        from pydantic import ValidationError  # noqa: PLC0415

        from tuneloop.storage import NotFoundError  # noqa: PLC0415

        uri = self.ctx.run_uri(Layout.PROMOTED)
        try:
            raw = self.sources.storage(uri).read_bytes(uri)
        except NotFoundError:
            return None
        advice = (
            "the operator writes it when it promotes a run; fix or delete the object (deleting it means nothing is "
            "promoted), or set spec.promotion.pin to a run whose model exists"
        )
        try:
            return PromotedPointer.model_validate_json(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'the object'}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise InvalidConfigError(
                f"{uri} is not a valid promoted-model pointer (format tuneloop-promoted/1): {problems}; {advice}"
            ) from None

    def _read_promoted_profile(self, run: int) -> tuple[DataProfile | None, str]:
        """The promoted run's data profile, or why there is none (never fatal: drift is a report)."""
        from tuneloop.storage import NotFoundError, StorageError  # noqa: PLC0415

        uri = self.ctx.run_uri(Layout.data_profile(run))
        try:
            raw = self.sources.storage(uri).read_json(uri)
        except NotFoundError:
            return None, f"run {run} has no data profile ({uri}; runs by earlier trainers did not write one)"
        except StorageError as exc:
            return None, f"its data profile could not be read: {exc}"
        try:
            return DataProfile.from_dict(raw), ""
        except ValueError as exc:
            return None, f"its data profile {uri} is not usable: {exc}"

    def _evaluate_promoted(self, pointer: PromotedPointer, test_examples: Sequence[Example]) -> PromotedEvaluation:
        """The promoted model on this run's test split (and out-of-domain set), through
        :meth:`evaluate` like the candidate. A model that cannot be loaded is reported, not
        raised: the gates that need it fail, the others are judged as usual."""
        where = f"run {pointer.run}, {pointer.model_uri}"
        self.sinks.message(
            f"   evaluating the promoted model ({where}) on this run's test split ({len(test_examples):,} rows)"
            + (f" and out-of-domain set ({len(self.data.out_of_domain):,} rows)" if self.data.out_of_domain else "")
        )
        self._release_candidate()
        try:
            trained = self._load_promoted(pointer)
        except _PromotedUnavailable as exc:
            self.sinks.message(f"   the promoted model ({where}) could not be evaluated: {exc}")
            return PromotedEvaluation(pointer.run, pointer.model_uri, {}, error=str(exc))
        try:
            metrics = self._measure_promoted(trained, test_examples)
        finally:  # the last reference to it: freed here, not when the run ends
            del trained
            _free_memory()
        return PromotedEvaluation(pointer.run, pointer.model_uri, metrics)

    def _measure_promoted(self, trained: TrainedModel, test_examples: Sequence[Example]) -> dict[str, float]:
        target = self._promoted_target(trained)
        features = self._promoted_features(trained, test_examples)
        metrics = dict(self.evaluate(features, test_examples, final=True, target=target).metrics)
        self.sinks.evaluation(self.state.step, "promoted", metrics)
        if self.data.out_of_domain:
            ood_features = self._promoted_features(trained, self.data.out_of_domain)
            ood = self.evaluate(ood_features, self.data.out_of_domain, final=True, target=target).metrics
            metrics.update({f"ood_{k}": v for k, v in ood.items()})
            self.sinks.evaluation(self.state.step, "promoted-out-of-domain", ood)
        return metrics

    def _release_candidate(self) -> None:
        """Drop the candidate model and the optimizer state (its weights are on disk by now)."""
        self.accelerator.free_memory()
        # The last references to them: nothing reads them once the candidate is written.
        del self.model, self.optimizer, self.scheduler, self.unfreezer, self.loaded
        self.state.best_weights = None
        _free_memory()

    def _load_promoted(self, pointer: PromotedPointer) -> TrainedModel:
        """Bring the promoted model to local disk and load it for this job's task; raises
        :class:`_PromotedUnavailable` saying why it cannot be (a transient storage error is
        raised as it is: the run is retried)."""
        from tuneloop.storage import NotFoundError, StorageError  # noqa: PLC0415
        from tuneloop_trainer.errors import PERMANENT_STORAGE_CODES  # noqa: PLC0415

        uri = pointer.model_uri
        try:
            directory = self._fetch_promoted(uri)
            base = self.resolved
            if pointer.base_model_uri and pointer.base_model_uri != self.spec.model.uri:
                try:
                    source = ModelSource(uri=pointer.base_model_uri)
                except ValueError:
                    raise _PromotedUnavailable(
                        f"its baseModelUri {pointer.base_model_uri[:200]!r} is not a model URI (hf://, s3://, file://)"
                    ) from None
                base = resolve_model(source, self.sources.download_model, self.sources.cache_dir)
            names = self.promoted_profile.label_names if self.promoted_profile is not None else None
            trained = load_trained_model(self.spec, directory, uri, base, names or self.data.label_names)
        except NotFoundError:
            raise _PromotedUnavailable("it no longer exists") from None
        except StorageError as exc:
            if exc.code in PERMANENT_STORAGE_CODES:
                raise _PromotedUnavailable(str(exc)) from None
            raise
        except UnsupportedModelError as exc:
            raise _PromotedUnavailable(exc.message) from None
        except torch.cuda.OutOfMemoryError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError) as exc:  # what loaders raise for files they cannot use
            raise _PromotedUnavailable(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}") from None
        if not getattr(trained.model, "is_loaded_in_4bit", False):  # bitsandbytes placed it already
            trained.model.to(self.device)
        return trained

    def _fetch_promoted(self, uri: str) -> Path:
        """The promoted model's directory on local disk."""
        import hashlib  # noqa: PLC0415

        scheme = uri.split("://", 1)[0]
        if scheme == "file":
            path = Path(uri.removeprefix("file://"))
            if not path.is_dir():
                raise _PromotedUnavailable(f"it no longer exists ({path} is not a directory)")
            return path
        if scheme != "s3":
            raise _PromotedUnavailable("its URI is not s3:// or file://, which this trainer reads models from")
        if not self.sources.storage(uri).list(uri):
            raise _PromotedUnavailable("it no longer exists (nothing is stored under it)")
        dest = self.sources.cache_dir / "promoted" / hashlib.sha256(uri.encode()).hexdigest()[:24]
        return self.sources.download_model(uri, dest)

    def _promoted_target(self, trained: TrainedModel) -> EvalTarget:
        index = None
        current = self.data.label_names
        if current is not None and trained.label_names is not None and trained.label_names != current:
            outputs = {name: i for i, name in enumerate(trained.label_names)}
            index = torch.tensor([outputs.get(name, -1) for name in current], dtype=torch.long)
            missing = [n for n in current if n not in outputs]
            self.sinks.message(
                f"   the promoted model was trained on the classes {', '.join(trained.label_names)}"
                + (f"; it cannot predict {', '.join(missing)}" if missing else "")
            )
        return EvalTarget(trained.model, trained.tokenizer, trained.config, trained.method, index)

    def _promoted_features(self, trained: TrainedModel, examples: Sequence[Example]) -> list[Feature]:
        """The examples as the promoted model reads them: its own tokenizer, and no more tokens
        than it takes."""
        max_len = self.hp.max_seq_length
        limit = max_input_tokens(trained.config, trained.method)
        if limit is not None and 1 <= limit.tokens < max_len:
            max_len = limit.tokens
        return build_features(examples, self.spec.task, trained.tokenizer, max_len, self.spec.columns())


class _PromotedUnavailable(Exception):
    """The promoted model cannot be evaluated; the message says why, for the gates' messages."""


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
