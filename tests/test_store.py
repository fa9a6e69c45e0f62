"""The on-disk model state: StateStore files and DetectorJob.load_state."""

import io
import json
import logging
import random
import zipfile

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from detectors.seasonal import SeasonalDetector
from exporter.config import parse_config
from exporter.job import DetectorJob
from exporter.metrics import SelfMetrics
from exporter.source import Panel, grid
from exporter.store import StateStore

STEP = 300.0
DAY = 86400.0
# A Monday 00:00 UTC.
START = 1_767_571_200.0
FIT_END = START + 3 * DAY - STEP


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "profile": rng.normal(size=(3, 48)).astype(np.float32),
        "level": rng.normal(size=3),
        "ready": np.array([True, False, True]),
        "seasonality": np.array([0, 1, 2], dtype=np.int8),
    }


def sample_meta() -> dict:
    return {"fingerprint": "0123abcd", "detector": {"bucket": 1800.0}, "series": [{"instance": "a"}]}


def leftovers(store: StateStore) -> list[str]:
    return sorted(p.name for p in store.directory.iterdir() if p.name != "cpu.npz")


# Save and load ---------------------------------------------------------------------------


def test_round_trip_arrays(tmp_path):
    store = StateStore(tmp_path)
    arrays = sample_arrays()
    store.save("cpu", arrays, sample_meta())

    loaded, _ = store.load("cpu")

    assert sorted(loaded) == sorted(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype, name
        np.testing.assert_array_equal(loaded[name], array)


def test_round_trip_meta(tmp_path):
    store = StateStore(tmp_path)
    meta = sample_meta() | {"note": "gr\u00fc\u00dfe", "nested": {"list": [1, 2.5, None]}}
    store.save("cpu", sample_arrays(), meta)

    _, loaded = store.load("cpu")

    assert loaded == meta


def test_save_replaces_previous(tmp_path):
    store = StateStore(tmp_path)
    store.save("cpu", {"level": np.zeros(2)}, {"version": 1})
    store.save("cpu", {"level": np.ones(3)}, {"version": 2})

    arrays, meta = store.load("cpu")

    assert meta == {"version": 2}
    np.testing.assert_array_equal(arrays["level"], np.ones(3))


def test_save_leaves_no_temporary_files(tmp_path):
    store = StateStore(tmp_path)
    store.save("cpu", sample_arrays(), sample_meta())
    store.save("cpu", sample_arrays(), sample_meta())

    assert leftovers(store) == []


def test_store_creates_directory(tmp_path):
    store = StateStore(tmp_path / "a" / "b")
    store.save("cpu", sample_arrays(), sample_meta())

    assert (tmp_path / "a" / "b" / "cpu.npz").is_file()


def test_missing_file_is_none(tmp_path):
    assert StateStore(tmp_path).load("cpu") is None


def test_no_directory_keeps_nothing(tmp_path):
    store = StateStore(None)
    store.save("cpu", sample_arrays(), sample_meta())

    assert store.path("cpu") is None
    assert store.load("cpu") is None


def test_delete_removes_file(tmp_path):
    store = StateStore(tmp_path)
    store.save("cpu", sample_arrays(), sample_meta())
    store.delete("cpu")

    assert store.load("cpu") is None
    assert not (tmp_path / "cpu.npz").exists()


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_save_keeps_previous(tmp_path, monkeypatch, failing):
    store = StateStore(tmp_path)
    store.save("cpu", {"level": np.arange(4.0)}, {"version": 1})

    def fail(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(f"exporter.store.os.{failing}", fail)
    with pytest.raises(OSError):
        store.save("cpu", {"level": np.zeros(9)}, {"version": 2})
    monkeypatch.undo()
    arrays, meta = store.load("cpu")

    assert meta == {"version": 1}
    np.testing.assert_array_equal(arrays["level"], np.arange(4.0))
    assert leftovers(store) == []


def test_unserialisable_meta_keeps_previous(tmp_path):
    store = StateStore(tmp_path)
    store.save("cpu", {"level": np.arange(4.0)}, {"version": 1})

    with pytest.raises(TypeError):
        store.save("cpu", {"level": np.zeros(9)}, {"version": object()})
    _, meta = store.load("cpu")

    assert meta == {"version": 1}
    assert leftovers(store) == []


# Damaged files ---------------------------------------------------------------------------


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def meta_array(document) -> np.ndarray:
    return np.frombuffer(json.dumps(document).encode(), dtype=np.uint8)


def raw_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.arange(3.0))
    return buffer.getvalue()


def valid_file_bytes(tmp_path) -> bytes:
    store = StateStore(tmp_path / "source")
    store.save("cpu", sample_arrays(), sample_meta())
    return store.path("cpu").read_bytes()


DAMAGED = {
    "random bytes": lambda good: random.Random(3).randbytes(2048),
    "empty": lambda good: b"",
    "truncated zip": lambda good: good[: len(good) // 2],
    "no metadata": lambda good: npz_bytes(level=np.zeros(3)),
    "object array": lambda good: npz_bytes(level=np.array([{"a": 1}], dtype=object), __meta__=meta_array({})),
    "metadata not json": lambda good: npz_bytes(__meta__=np.frombuffer(b"{not json", dtype=np.uint8)),
    "metadata not utf8": lambda good: npz_bytes(__meta__=np.frombuffer(b"\xff\xfe", dtype=np.uint8)),
    "metadata a list": lambda good: npz_bytes(__meta__=meta_array([1, 2])),
    "plain npy": lambda good: npy_bytes(),
    "raw zip member": lambda good: raw_zip({"__meta__": b"{}", "level.npy": b"junk"}),
}


@pytest.mark.parametrize("damage", DAMAGED.values(), ids=DAMAGED.keys())
def test_damaged_file_is_none(tmp_path, caplog, damage):
    store = StateStore(tmp_path / "state")
    store.path("cpu").write_bytes(damage(valid_file_bytes(tmp_path)))

    with caplog.at_level(logging.ERROR, logger="exporter.store"):
        result = store.load("cpu")

    assert result is None
    assert any("detector=cpu" in record.getMessage() for record in caplog.records)


def test_flipped_bytes_never_raise(tmp_path):
    # Each damaged copy must load or be rejected; neither may raise.
    good = valid_file_bytes(tmp_path)
    store = StateStore(tmp_path / "state")
    rng = random.Random(11)
    outcomes = {"loaded": 0, "rejected": 0}
    for _ in range(300):
        damaged = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        store.path("cpu").write_bytes(bytes(damaged))
        outcomes["loaded" if store.load("cpu") is not None else "rejected"] += 1

    assert outcomes["rejected"] > 0


# DetectorJob.load_state ------------------------------------------------------------------


def daily_values(timestamps: np.ndarray, n_series: int = 4) -> np.ndarray:
    """Daily sine plus noise; the noise depends only on the timestamp, so every query agrees."""
    phases = np.linspace(0.0, 2.0, n_series)[:, None]
    cycle = 50.0 + 10.0 * np.sin(2 * np.pi * timestamps / DAY + phases)
    noise = np.array([np.random.default_rng(int(t)).normal(0, 0.5, n_series) for t in timestamps]).T
    return cycle + noise.reshape(n_series, timestamps.size)


class PanelSource:
    """A stand-in for PrometheusSource that serves the synthetic series on the requested grid."""

    def __init__(self, config, spike_at: float | None = None):
        self.config = config
        self.up = True
        self.spike_at = spike_at

    def query_range(self, query, start, end, step):
        timestamps = grid(start, end, step)
        values = daily_values(timestamps)
        if self.spike_at is not None:
            values[1, timestamps == self.spike_at] += 30.0
        labels = [{"instance": f"host-{i}"} for i in range(values.shape[0])]
        return Panel(values, timestamps, labels)


def detector_config(band_sigmas: float = 3.0):
    data = {
        "source": {"url": "http://127.0.0.1:9", "query_delay": "0s"},
        "detectors": [
            {
                "name": "cpu",
                "query": "cpu_usage",
                "type": "seasonal",
                "step": "5m",
                "fit_window": "3d",
                "entity_labels": ["instance"],
                "params": {"band_sigmas": band_sigmas, "min_history": "1d"},
            }
        ],
    }
    return parse_config(data)


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_job(store, band_sigmas=3.0, clock=None, spike_at=None) -> DetectorJob:
    config = detector_config(band_sigmas)
    return DetectorJob(
        config.detectors[0],
        PanelSource(config.source, spike_at),
        store,
        SelfMetrics(CollectorRegistry()),
        clock=clock or Clock(FIT_END),
    )


@pytest.fixture
def fitted(tmp_path):
    """A state file written by a real fit, and the job that wrote it."""
    store = StateStore(tmp_path / "state")
    job = make_job(store)
    job.fit()
    assert store.path("cpu").is_file()
    return store, job


def rewrite(store: StateStore, change_arrays=None, change_meta=None) -> None:
    arrays, meta = store.load("cpu")
    if change_arrays:
        change_arrays(arrays)
    if change_meta:
        change_meta(meta)
    store.save("cpu", arrays, meta)


def test_load_state_genuine(fitted):
    store, _ = fitted

    assert make_job(store).load_state() is True


def test_restored_scores_match(fitted):
    # The original is a detector fitted directly on the panel the job fitted on.
    store, job = fitted
    fit_times = grid(FIT_END - 3 * DAY, FIT_END, STEP)
    original = SeasonalDetector(job.config.typed_params(), step=STEP).fit(daily_values(fit_times), fit_times)
    later = FIT_END + 2 * 3600.0
    spike = later - 6 * STEP
    new_times = grid(FIT_END + STEP, later, STEP)
    new_values = daily_values(new_times)
    new_values[1, new_times == spike] += 30.0
    expected = original.score(new_values, new_times)
    restored = make_job(store, clock=Clock(later), spike_at=spike)
    assert restored.load_state() is True

    restored.score()
    snapshot = restored.snapshot
    rows = [int(labels["instance"].removeprefix("host-")) for labels in snapshot.labels]

    assert sorted(rows) == [0, 1, 2, 3]
    assert np.isfinite(snapshot.score).all()
    np.testing.assert_allclose(snapshot.score, expected.score[rows, -1], rtol=1e-12)
    np.testing.assert_allclose(snapshot.expected, expected.expected[rows, -1], rtol=1e-12)
    np.testing.assert_allclose(snapshot.lower, expected.lower[rows, -1], rtol=1e-12)
    np.testing.assert_allclose(snapshot.upper, expected.upper[rows, -1], rtol=1e-12)


def test_restored_matches_running_job(fitted):
    # fit() also scores the newest fit points for /metrics, which must not move the model past the saved one.
    store, running = fitted
    later = FIT_END + 2 * 3600.0
    running.clock = Clock(later)
    restored = make_job(store, clock=Clock(later))
    assert restored.load_state() is True

    running.score()
    restored.score()

    np.testing.assert_allclose(restored.snapshot.score, running.snapshot.score, rtol=1e-12)


def test_unfitted_job_scores_differ(fitted):
    # Guards test_restored_scores_match: without the saved model, scores are missing.
    store, _ = fitted
    later = FIT_END + 2 * 3600.0
    job = make_job(store, clock=Clock(later))

    job.score()

    assert np.isnan(job.snapshot.score).all()


def test_load_state_other_fingerprint(fitted, caplog):
    store, _ = fitted

    with caplog.at_level(logging.INFO, logger="exporter.job"):
        loaded = make_job(store, band_sigmas=4.0).load_state()

    assert loaded is False
    assert any("another configuration" in record.getMessage() for record in caplog.records)


def test_load_state_no_file(tmp_path):
    assert make_job(StateStore(tmp_path)).load_state() is False


def test_load_state_damaged_file(tmp_path):
    store = StateStore(tmp_path)
    store.path("cpu").write_bytes(b"PK\x03\x04 not really a zip")

    assert make_job(store).load_state() is False


def drop_column(name):
    return lambda arrays: arrays.update({name: arrays[name][:, :-1]})


def drop_row(name):
    return lambda arrays: arrays.update({name: arrays[name][:-1]})


BAD_STATE = [
    pytest.param(drop_column("profile"), None, id="profile columns"),
    pytest.param(drop_column("spread"), None, id="spread columns"),
    pytest.param(drop_row("spread"), None, id="spread rows"),
    pytest.param(drop_row("ready"), None, id="ready length"),
    pytest.param(drop_row("seasonality"), None, id="seasonality length"),
    pytest.param(lambda a: a.pop("tail_factor"), None, id="missing array"),
    pytest.param(lambda a: a.update(profile=np.full_like(a["profile"], np.nan)), None, id="nan profile"),
    pytest.param(None, lambda m: m["series"].pop(), id="series count"),
    pytest.param(None, lambda m: m["detector"].update(format_version=-1), id="format version"),
    pytest.param(None, lambda m: m["detector"].update(bucket=600.0, day_buckets=144), id="other bucket"),
    pytest.param(None, lambda m: m.pop("series"), id="no series list"),
    pytest.param(None, lambda m: m.update(detector=[]), id="detector meta list"),
    pytest.param(
        lambda a: a.update(level=a["level"][:, None]), None, id="level 2-d",
    ),
    pytest.param(
        lambda a: a.update(level=np.array(1.0)), None, id="level 0-d",
    ),
    pytest.param(
        None, lambda m: m["detector"].update(fitted_until="soon"), id="fitted_until text",
    ),
    pytest.param(
        None, lambda m: m.update(series=[{"instance": ["a"]} for _ in m["series"]]), id="label value list",
    ),
]


@pytest.mark.parametrize("change_arrays, change_meta", BAD_STATE)
def test_load_state_rejects(fitted, caplog, change_arrays, change_meta):
    store, _ = fitted
    rewrite(store, change_arrays, change_meta)

    with caplog.at_level(logging.ERROR, logger="exporter.job"):
        loaded = make_job(store).load_state()

    assert loaded is False
    assert any(record.levelno == logging.ERROR for record in caplog.records)
