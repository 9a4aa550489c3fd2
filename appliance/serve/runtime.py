"""The device runtime: from the active bundles and the hardware probe to loaded engines.

One `Runtime` per server process. It picks a variant for every model of every active bundle,
loads the engines this build serves, and records what it chose and why in
`/run/appliance/runtime.json`, which `appliance-ctl status` shows.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from appliance import __version__
from appliance.bundle import manifest as mf
from appliance.device.layout import Layout
from appliance.device.store import Installed, Store
from appliance.engines.base import ChatBackend, EmbedBackend, Engine, TranscribeBackend
from appliance.engines.score import CosineScorer, Scorer
from appliance.errors import ApplianceError, Busy, ModelNotFound, ModelUnavailable, Unsupported
from appliance.fsutil import atomic_write
from appliance.serve import hardware
from appliance.serve.settings import Settings

log = logging.getLogger(__name__)
RETIRE_GRACE = 10.0  # seconds a replaced engine stays up at least (see Runtime._retire)
E = TypeVar("E", bound=Engine)
# How a model of each task becomes an engine; tests give fakes here (tests/fakes.py).
Loader = Callable[["Runtime", Installed, "LoadedModel"], Engine]


@dataclass
class LoadedModel:
    id: str
    task: mf.Task
    bundle: str
    sequence: int
    created: int
    choice: hardware.Choice
    model: mf.Model
    engine: Engine | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Served(Generic[E]):
    """A loaded model with its engine, typed by task."""

    model: LoadedModel
    engine: E

    @property
    def id(self) -> str:
        return self.model.id

    @property
    def fingerprint(self) -> str:
        """What answered: this software, the bundle and its sequence."""
        return f"appliance-{__version__}-{self.model.bundle}-{self.model.sequence}"


def _gpu_layers(path: str, offload: float) -> int:
    """llama.cpp's n_gpu_layers for a share of the model's layers (-1: all)."""
    if offload >= 1.0:
        return -1
    if offload <= 0:
        return 0
    import ctypes

    import llama_cpp as ll
    params = ll.llama_model_default_params()
    params.vocab_only = True  # metadata only: cheap
    model = ll.llama_model_load_from_file(path.encode(), params)
    if not model:
        raise ApplianceError(f"llama.cpp could not read {path}")
    try:
        arch = ctypes.create_string_buffer(128)
        ll.llama_model_meta_val_str(model, b"general.architecture", arch, 128)
        count = ctypes.create_string_buffer(32)
        ll.llama_model_meta_val_str(model, arch.value + b".block_count", count, 32)
        return int(int(count.value or b"0") * offload)
    finally:
        ll.llama_model_free(model)


class Runtime:
    def __init__(self, layout: Layout, settings: Settings,
                 probe: hardware.Probe | None = None,
                 loaders: Mapping[mf.Task, Loader] | None = None, *,
                 fingerprint: str | None = None) -> None:
        self.layout = layout
        self.settings = settings
        self.fingerprint = fingerprint  # of the TLS certificate the main listener presents
        self.probe = probe or hardware.probe()
        self.loaders: Mapping[mf.Task, Loader] = loaders or {
            mf.Task.CHAT: Runtime._load_chat, mf.Task.EMBEDDINGS: Runtime._load_embed,
            mf.Task.TRANSCRIPTION: Runtime._load_whisper}
        self.models: dict[str, LoadedModel] = {}
        self.serving: dict[str, int] = {}  # bundle -> the sequence whose models answer
        self.swap_note: str | None = None
        self.started = time.time()
        self._crashed: set[str] = set()
        self._refused: set[tuple[str, int | None]] = set()  # failed trials: not tried again
        self._retiring: list[tuple[float, list[LoadedModel]]] = []
        self._switching: set[str] = set()  # model ids being drained before their successor
        # a new system version on trial (systemd-boot counts this boot): every active bundle
        # is self-tested and the results published, for `appliance-ctl system check`
        from appliance.device import system
        self.system_trial = system.counted_boot(layout)
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        from appliance.engines.lanes import CoreLanes
        self.lanes = CoreLanes(settings.threads or self.probe.physical_cores, settings.aux_cores)

    def load(self) -> None:
        """Load every model of every active bundle. A model that fails to load, for whatever
        reason, is reported (status, /healthz) and the others are served. One that took the
        whole process down while loading (a crash inside a native library) is skipped on the
        next start, as recorded in /run, instead of crashing every start after it. A sequence
        on trial is self-tested first (`_bring_up`)."""
        # read-only: the service never changes the store (imports do, as root)
        self._crashed = self._crashed_loads()
        for inst in Store(self.layout).active_bundles():
            self._serve_sequence(inst)
        self._write_status()

    def follow(self, interval: float = 1.0) -> threading.Thread:
        """Follow the store from now on: when a bundle's active sequence changes (an import,
        activate, rollback, or a failed trial falling back), load the new sequence beside the
        old one, self-test it if it is on trial, switch new requests over in one step, and
        close the old engines once the requests they were serving are done."""

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.sync()
                except Exception:  # the next round tries again; serving goes on
                    log.exception("following the store failed")

        thread = threading.Thread(target=loop, name="follow-store", daemon=True)
        thread.start()
        return thread

    def sync(self) -> None:
        """One round of `follow`: swap what changed in the store, retire what is idle."""
        store = Store(self.layout)
        with self._swap_lock:
            installed = set(store.names())  # one listing per round, not one per bundle
            for name in sorted(installed | set(self.serving)):
                want = store.active(name) if name in installed else None
                if want == self.serving.get(name) or (name, want) in self._refused:
                    continue
                self._swap(store, name, want)
            self._retire()

    def _swap(self, store: Store, name: str, want: int | None) -> None:
        self._refused = {r for r in self._refused if r[0] != name}
        old = [m for m in self.models.values() if m.bundle == name]
        if want is None:
            log.info("bundle %s is no longer active", name)
            self._replace(name, {}, None)
            self._retiring.append((time.monotonic(), old))
            self._write_status()
            return
        inst = store.load(name, want)
        need = self._memory_needed(inst)
        _, available = hardware.meminfo()
        drain_first = bool(old) and need > available * self.settings.memory_fraction
        if drain_first:
            log.warning("bundle %s: %d MiB needed, %d MiB available: draining sequence %s "
                        "before loading %s", name, need, available, self.serving.get(name), want)
            self.swap_note = (f"{name}: drained sequence {self.serving.get(name)} before "
                              f"loading {want} ({need} MiB needed, {available} MiB available)")
            self._switching |= {m.id for m in old}
            self._replace(name, {}, None)
            self._drain(old)
        log.info("bundle %s: loading sequence %s", name, want)
        self._serve_sequence(inst)  # leaves self.models as it was when the trial fails
        if self.serving.get(name) == want:
            if not drain_first:
                self._retiring.append((time.monotonic(), old))
            log.info("bundle %s: now serving sequence %s", name, want)
        else:  # the old sequence keeps answering until settle falls back
            self._refused.add((name, want))
        self._switching -= {m.id for m in old}
        self._write_status()

    def _serve_sequence(self, inst: Installed) -> None:
        """Load a sequence's models and serve them all at once. A sequence on trial (or one
        that failed a trial before) is self-tested first and the result published. A failed
        trial with a last good sequence to fall back to serves nothing of this one (the old
        one keeps answering until the fallback); without one, only the models that loaded and
        passed answer, and the others are reported as failed: no model that failed its
        check is ever served."""
        loaded = {m.id: self._load_tracked(inst, m) for m in inst.manifest.models}
        store = Store(self.layout)
        on_trial = store.trial(inst.name) == inst.sequence
        if on_trial or inst.sequence in store.bad(inst.name) or self.system_trial:
            # a trial with something to fall back to is decided by its first failure: the
            # remaining checks are skipped, so the fallback comes sooner (minutes on slow CPUs)
            decided = on_trial and store.last_good(inst.name) is not None
            failed = self._self_test(inst, loaded, publish=on_trial or self.system_trial,
                                     stop_on_failure=decided)
            if failed and on_trial and store.last_good(inst.name) is not None:
                for m in loaded.values():
                    _close(m)
                return
            for model_id, reason in failed.items():
                m = loaded[model_id]
                _close(m)
                m.error = m.error or f"failed its self-test: {reason}"
        self._replace(inst.name, loaded, inst.sequence)

    def _replace(self, name: str, loaded: dict[str, LoadedModel], sequence: int | None) -> None:
        models = {k: v for k, v in self.models.items() if v.bundle != name}
        for model_id, m in loaded.items():
            if model_id in models:
                log.warning("model %s of bundle %s hides another bundle's", model_id, name)
                continue
            models[model_id] = m
        self.models = models  # one assignment: a request sees the old set or the new one
        if sequence is None:
            self.serving.pop(name, None)
        else:
            self.serving[name] = sequence

    def _load_tracked(self, inst: Installed, model: mf.Model) -> LoadedModel:
        tag = f"{inst.name}-{inst.sequence}/{model.id}"
        if tag in self._crashed:
            return self._failed(inst, model, "the service stopped while loading this model "
                                "before (a crash in its runtime); skipped until the bundle "
                                "changes or a reboot")
        atomic_write(self._loading_path, tag.encode())
        try:
            return self._load_model(inst, model)
        finally:  # a crash skips this; an orderly stop (SIGTERM, Ctrl-C) does not
            self._loading_path.unlink(missing_ok=True)

    def _self_test(self, inst: Installed, loaded: dict[str, LoadedModel],
                   publish: bool, stop_on_failure: bool = False) -> dict[str, str]:
        """Run the signed checks on the variants this device chose; write the result where
        the privileged settle step reads it (the service never writes the store). Returns
        the models that failed, with why."""
        from appliance.engines import selftest
        results: list[dict[str, Any]] = []
        for model in inst.manifest.models:
            m = loaded[model.id]
            if stop_on_failure and model.checks and not all(r["passed"] for r in results):
                results.append(selftest.CheckResult(
                    model.id, False, "not run: an earlier check failed").to_json())
                continue
            if m.engine is None:
                results.append(selftest.CheckResult(model.id, False,
                                                    f"failed to load: {m.error}").to_json())
                continue
            for r in selftest.run(model, m.engine, inst.path / "files"):
                results.append({**r.to_json(), "variant": m.choice.to_json()["quantization"],
                                "backend": m.choice.to_json()["backend"]})
        passed = all(r["passed"] for r in results)
        report = {"bundle": inst.name, "sequence": inst.sequence, "passed": passed,
                  "checks": results, "finished": int(time.time())}
        if publish:
            folder = self.layout.run / "selftest"
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / f"{inst.name}-{inst.sequence}.json",
                         json.dumps(report, indent=2).encode())
        level = logging.INFO if passed else logging.ERROR
        log.log(level, "self-test of %s %s %s: %s", inst.name, inst.sequence,
                "passed" if passed else "FAILED",
                "; ".join(f"{r['model']}: {r['detail']}" for r in results) or "no checks")
        failed: dict[str, str] = {}
        for entry in results:
            if not entry["passed"]:
                failed.setdefault(entry["model"], entry["detail"])
        return failed

    def _memory_needed(self, inst: Installed) -> int:
        total = 0
        for model in inst.manifest.models:
            try:
                total += hardware.choose(self.probe, model, self.settings.prefer,
                                         self.settings.memory_fraction, self.settings.threads,
                                         dict(self.settings.quantization).get(model.id)
                                         ).variant.memory_mb
            except hardware.NoVariant:
                continue
        return total

    def _drain(self, old: list[LoadedModel], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while any(m.engine is not None and not m.engine.idle() for m in old):
            if time.monotonic() > deadline:
                log.warning("requests still running after %.0f s; closing anyway", timeout)
                break
            time.sleep(0.1)
        for m in old:
            _close(m)

    def _retire(self) -> None:
        """Close replaced engines once idle (after a grace period for requests that had just
        looked their model up and not yet reached the engine)."""
        keep = []
        now = time.monotonic()
        for since, models in self._retiring:
            rest = []
            for m in models:
                if m.engine is None:
                    continue
                if now - since >= RETIRE_GRACE and m.engine.idle():
                    _close(m)
                else:
                    rest.append(m)
            if rest:
                keep.append((since, rest))
        self._retiring = keep

    @property
    def _loading_path(self) -> Path:
        return self.layout.run / "loading"

    def _crashed_loads(self) -> set[str]:
        """Models whose load never finished in an earlier start (kept in /run: a reboot, or a
        new sequence of the bundle, gives them another try)."""
        self.layout.run.mkdir(parents=True, exist_ok=True)
        record = self.layout.run / "crashed-loads"
        crashed = set(record.read_text().split()) if record.exists() else set()
        if self._loading_path.exists():
            tag = self._loading_path.read_text().strip()
            log.error("the last start stopped while loading %s; skipping it", tag)
            crashed.add(tag)
            atomic_write(record, "\n".join(sorted(crashed)).encode())
            self._loading_path.unlink()
        return crashed

    def _failed(self, inst: Installed, model: mf.Model, error: str) -> LoadedModel:
        placeholder = hardware.Choice(model.variants[0], mf.Backend.CPU, 0, 0, error)
        return LoadedModel(model.id, model.task, inst.name, inst.sequence,
                           int(inst.manifest.created.timestamp()), placeholder, model,
                           error=error)

    def _load_model(self, inst: Installed, model: mf.Model) -> LoadedModel:
        try:
            choice = hardware.choose(self.probe, model, self.settings.prefer,
                                     self.settings.memory_fraction, self.settings.threads,
                                     dict(self.settings.quantization).get(model.id))
        except hardware.NoVariant as exc:
            return self._failed(inst, model, exc.message)
        loaded = LoadedModel(model.id, model.task, inst.name, inst.sequence,
                             int(inst.manifest.created.timestamp()), choice, model)
        try:
            loaded.engine = self.loaders[model.task](self, inst, loaded)
        except Exception as exc:  # a damaged model file raises anything at all
            message = exc.message if isinstance(exc, ApplianceError) else (
                f"{type(exc).__name__}: {exc}")
            loaded.error = " ".join(message.split())[:500]  # one line, bounded
            log.error("model %s failed to load: %s", model.id, loaded.error)
        return loaded

    def _load_chat(self, inst: Installed, loaded: LoadedModel) -> Engine:
        from appliance.engines.chat import ChatEngine, EngineConfig
        s, choice = self.settings, loaded.choice
        path = inst.file(choice.variant.path)
        # each sequence gets its share of the KV budget, up to the model's own context length
        ctx = min(s.ctx_per_seq, s.kv_cells // (s.parallel + s.prefix_slots),
                  loaded.model.defaults.context_length or s.ctx_per_seq)
        config = EngineConfig(
            n_gpu_layers=_gpu_layers(str(path), choice.offload), threads=choice.threads,
            parallel=s.parallel, ctx_per_seq=ctx, batch=s.batch, max_queue=s.max_queue,
            prefix_slots=s.prefix_slots, lookup_draft=s.lookup_draft, draft_timed=True)
        engine = ChatEngine(path, config, self.lanes, loaded.model.defaults.chat_template)
        loaded.extra["context_length"] = engine.ctx_per_seq
        return engine

    def _load_embed(self, inst: Installed, loaded: LoadedModel) -> Engine:
        from appliance.engines.embed import EmbedEngine
        d = loaded.model.defaults
        variant = loaded.choice.variant
        # int8 activations are quantised per run: one row per run keeps a text's vector the
        # same whatever it is batched with (engines/embed.py)
        engine = EmbedEngine(inst.file(variant.path), d.max_input_tokens or 512, self.lanes,
                             max_batch=1 if variant.quantization == "int8" else 32,
                             max_queue=self.settings.max_queue)
        if d.dimensions and d.dimensions != engine.dimensions:
            engine.close()
            raise ApplianceError(f"{loaded.id}: the bundle says {d.dimensions} dimensions, the "
                                 f"model gives {engine.dimensions}")
        return engine

    def _load_whisper(self, inst: Installed, loaded: LoadedModel) -> Engine:
        from appliance.engines.transcribe import TranscribeEngine
        gpu = loaded.choice.backend is mf.Backend.CUDA
        return TranscribeEngine(
            inst.file(loaded.choice.variant.path), self.lanes, device="cuda" if gpu else "cpu",
            compute_type="float16" if gpu else "int8", threads=1,
            languages=loaded.model.defaults.languages, max_queue=self.settings.max_queue)

    # `allowed`: the model ids an API key may use (None: all). Any other model is answered
    # exactly as one that does not exist, so a scoped key learns nothing about it.

    def chat(self, model_id: str, allowed: Collection[str] | None = None) -> Served[ChatBackend]:
        return self._served(model_id, mf.Task.CHAT, allowed)

    def embeddings(self, model_id: str,
                   allowed: Collection[str] | None = None) -> Served[EmbedBackend]:
        return self._served(model_id, mf.Task.EMBEDDINGS, allowed)

    def transcription(self, model_id: str,
                      allowed: Collection[str] | None = None) -> Served[TranscribeBackend]:
        return self._served(model_id, mf.Task.TRANSCRIPTION, allowed)

    def scorer(self, model_id: str,
               allowed: Collection[str] | None = None) -> tuple[LoadedModel, Scorer]:
        """How a model scores documents for POST /v1/rerank: an embeddings model by the cosine
        of its vectors (engines/score.py); a cross-encoder task would hand out its own scorer
        here. A model of another task that the key may see is named with its task (400)."""
        try:
            served = self.embeddings(model_id, allowed)
        except ModelNotFound:
            other = next((m for m in self.served(allowed) if m.id == model_id), None)
            if other is None:
                raise
            raise Unsupported("model", f"`{model_id}` is a {other.task.value} model; "
                                       "reranking scores with an embeddings model") from None
        return served.model, CosineScorer(served.engine)

    def _served(self, model_id: str, task: mf.Task,
                allowed: Collection[str] | None) -> Served[Any]:
        loaded = self.get(model_id, task, allowed)
        return Served(loaded, cast(Any, loaded.engine))

    def get(self, model_id: str, task: mf.Task,
            allowed: Collection[str] | None = None) -> LoadedModel:
        visible = allowed is None or model_id in allowed
        loaded = self.models.get(model_id) if visible else None
        if loaded is None and visible and model_id in self._switching:
            raise Busy(f"the model `{model_id}` is being replaced by a new version; retry "
                       "shortly", retry_after=5)
        if loaded is not None and loaded.engine is None and loaded.task is task:
            raise ModelUnavailable(f"The model `{model_id}` failed to load on this appliance: "
                                   f"{loaded.error}", param="model")
        if loaded is None or loaded.engine is None or loaded.task is not task:
            served = [m.id for m in self.served(allowed) if m.task is task]
            raise ModelNotFound(
                f"The model `{model_id}` does not exist or does not serve {task.value}",
                hint=f"available: {', '.join(served) or 'none'}", param="model")
        return loaded

    def served(self, allowed: Collection[str] | None = None) -> list[LoadedModel]:
        return [m for m in self.models.values()
                if m.engine is not None and (allowed is None or m.id in allowed)]

    def health(self) -> dict[str, Any]:
        """ok; degraded (some models failed to load, the others serve); unhealthy (an engine
        is dead or stuck, or nothing is served)."""
        engines = {m.id: _engine(m).health() for m in self.served()}
        # ids only: /healthz answers without a key, and an error may name paths
        failed = sorted(m.id for m in self.models.values() if m.engine is None)
        if not engines or any(v != "ok" for v in engines.values()):
            status = "unhealthy"
        else:
            status = "degraded" if failed else "ok"
        report: dict[str, Any] = {"status": status, "engines": engines}
        if failed:
            report["failed"] = failed
        return report

    def restart_would_help(self) -> bool:
        """A dead or stuck engine thread is what a restart cures; a model that cannot load
        fails the same way again, so it must not stop the watchdog (a restart loop)."""
        return any(_engine(m).health() != "ok" for m in self.served())

    def load_report(self) -> dict[str, Any]:
        report: dict[str, Any] = {}
        for m in self.served():
            eng = _engine(m)
            extra: dict[str, Any] = {}
            if m.task is mf.Task.CHAT:
                chat = cast(ChatBackend, eng)
                extra = {"active": chat.active_count, "queued": chat.queue_depth}
            report[m.id] = {"task": m.task.value, **extra, **eng.stats}
        return report

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "started": int(self.started),
            "listen": f"{self.settings.host}:{self.settings.port}",
            "tls": self.settings.tls,
            # on-device tools (status, the console) use the plain loopback listener if any
            **({"local": f"http://127.0.0.1:{self.settings.local_port}"}
               if self.settings.local_port else {}),
            **({"fingerprint": self.fingerprint} if self.fingerprint else {}),
            "probe": self.probe.to_json(),
            "lanes": self.lanes.report(),
            "serving": dict(self.serving),
            "swap_note": self.swap_note,
            "models": {
                m.id: {"task": m.task.value, "bundle": f"{m.bundle}-{m.sequence}",
                       "loaded": m.engine is not None, "error": m.error,
                       **m.choice.to_json()}
                for m in self.models.values()
            },
        }

    def _write_status(self) -> None:
        path = self.layout.run / "runtime.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(self.status(), indent=2).encode())

    def close(self) -> None:
        self._stop.set()
        with self._swap_lock:
            for m in self.served():
                _close(m)
            for _, models in self._retiring:
                for m in models:
                    _close(m)
        (self.layout.run / "runtime.json").unlink(missing_ok=True)


def _engine(m: LoadedModel) -> Engine:
    assert m.engine is not None
    return m.engine


def _close(m: LoadedModel) -> None:
    if m.engine is not None:
        try:
            m.engine.close()
        except Exception:  # closing must not stop closing the others
            log.exception("closing %s", m.id)
        m.engine = None
