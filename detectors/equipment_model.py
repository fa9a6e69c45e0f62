"""The ``equipment`` detector type: sensor limits and autoencoder per machine, plus fault signatures.

It runs ``detectors.equipment.EquipmentDetector`` over every sensor query of a detector and,
when a spectrum is configured, ``detectors._vibration.FaultSignatures``. Query keys:

* sensor keys, any names (``temperature``, ``vibration``, ``current`` ...): one series per
  machine; the key is the sensor name;
* ``speed``: the running speed of each machine (``faults.speed_unit``);
* ``spectrum``: band amplitudes of each machine, one series per band, with the band's
  frequency in Hz in the label ``frequency_label``.
"""

import copy
import math
import warnings
from typing import ClassVar

import numpy as np
from pydantic import ConfigDict, Field

from detectors._vibration import FaultSignatureParams, FaultSignatures
from detectors.base import STATE_FORMAT_VERSION, StateError
from detectors.equipment import MIN_WINDOW_SAMPLES, EquipmentDetector, EquipmentParams
from detectors.multi import (
    EntityResult,
    MultiInput,
    MultiQueryDetector,
    Problem,
    QuerySpec,
    Sample,
    last_sample_columns,
    prefixed,
    unprefixed,
)
from exporter.durations import format_duration, parse_duration

SPEED_KEY = "speed"
SPECTRUM_KEY = "spectrum"


class EquipmentTypeParams(EquipmentParams):
    """Parameters of the ``equipment`` type: the sensor model plus the fault signatures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    faults: FaultSignatureParams | None = None
    """Fault orders to score from the spectrum query; None scores no faults."""

    frequency_label: str = Field(default="frequency_hz", pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")
    """Label of the spectrum series that contains the band's frequency in Hz."""


class EquipmentTypeDetector(MultiQueryDetector):
    """Multi-query equipment detector; see the module docstring for its query keys."""

    Params = EquipmentTypeParams
    type_name: ClassVar[str] = "equipment"
    output_labels: ClassVar[tuple[str, ...]] = ("feature", "fault", "bearing")

    @classmethod
    def check_settings(
        cls, keys: list[str], params: EquipmentTypeParams, *, entity_labels: list[str], step: float, fit_window: float
    ) -> list[Problem]:
        problems: list[Problem] = []
        sensors = [key for key in keys if key not in (SPEED_KEY, SPECTRUM_KEY)]
        if not sensors:
            problems.append((("queries",), "no sensor key: set at least one query per sensor, such as "
                             "temperature: max by (equipment) (pump_motor_temperature_celsius)"))
        if params.faults is not None:
            if SPECTRUM_KEY not in keys:
                problems.append((("params", "faults"), "params.faults is set but the spectrum query is missing: "
                                 "add queries.spectrum"))
            if SPEED_KEY not in keys and params.faults.running_speed_rpm is None:
                problems.append((("params", "faults"), "params.faults needs the shaft speed: add queries.speed or "
                                 "set faults.running_speed_rpm"))
        else:
            for key in (SPECTRUM_KEY, SPEED_KEY):
                if key in keys:
                    problems.append((("queries", key), f"queries.{key} is set but params.faults is not, and only the "
                                     f"fault signatures read the {key}: configure params.faults or remove the query"))
        if SPECTRUM_KEY in keys and params.frequency_label in entity_labels:
            problems.append((("params", "frequency_label"), f"frequency label {params.frequency_label!r} is also an "
                             "entity label: set params.frequency_label to the label of the spectrum series that "
                             "contains the band's frequency in Hz"))
        for name in params.vibration_sensors:
            if name not in sensors:
                problems.append((("params", "vibration_sensors"), f"vibration sensor {name!r} has no query: add "
                                 f"queries.{name} or remove it from params.vibration_sensors"))
        return problems + cls._window_problems(params, step, fit_window)

    @staticmethod
    def _window_problems(params: EquipmentTypeParams, step: float, fit_window: float) -> list[Problem]:
        """Check the feature window against the step and the fit window against min_history."""
        window_samples = int(round(parse_duration(params.window) / step))
        if window_samples < MIN_WINDOW_SAMPLES:
            return [(("params", "window"), f"window {params.window!r} holds {window_samples} samples at step "
                     f"{format_duration(step)}: expected at least {MIN_WINDOW_SAMPLES}, so set at least "
                     f"{format_duration(MIN_WINDOW_SAMPLES * step)}")]
        try:
            EquipmentDetector(params, step=step)
        except ValueError as error:
            return [(("params",), str(error))]
        history = (int(math.floor(fit_window / step + 1e-9)) + 1) * step
        if history < parse_duration(params.min_history):
            return [(("fit_window",), f"fit_window {format_duration(fit_window)} holds {format_duration(history)} of "
                     f"samples at step {format_duration(step)}, less than params.min_history {params.min_history}, so "
                     "no machine could ever be scored: lengthen fit_window or lower params.min_history")]
        return []

    def query_spec(self, key: str) -> QuerySpec:
        if key == SPECTRUM_KEY:
            label = self.params.frequency_label
            return QuerySpec(entity=True, labels=(label,), numeric_labels=(label,), scored=False)
        if key == SPEED_KEY:
            return QuerySpec(entity=True, scored=False)
        return QuerySpec(entity=True)

    @property
    def needs_model_file(self) -> bool:
        return self.params.method != "limits"

    def scoring_copy(self) -> "EquipmentTypeDetector":
        # Scoring changes the windows and drift charts but never the Keras model, which is shared.
        autoencoder = getattr(self.model_, "autoencoder_", None)
        memo = {id(autoencoder): autoencoder} if autoencoder is not None else {}
        return copy.deepcopy(self, memo)

    # --- fit -----------------------------------------------------------------------------------

    def _sensor_rows(self, data: MultiInput) -> tuple[np.ndarray, list[str], list[str]]:
        values, entities, sensors = [np.empty((0, data.timestamps.size))], [], []
        for key in sorted(data.panels):
            if key in (SPEED_KEY, SPECTRUM_KEY):
                continue
            panel = data.panels[key]
            values.append(panel.values)
            entities += panel.entities
            sensors += [key] * len(panel.entities)
        return np.concatenate(values, axis=0), entities, sensors

    def fit(self, data: MultiInput, *, previous: MultiQueryDetector | None = None) -> "EquipmentTypeDetector":
        values, entities, sensors = self._sensor_rows(data)
        if not entities:
            raise ValueError("the sensor queries returned no series: nothing to fit")
        self.model_ = EquipmentDetector(self.params, step=self.step, timezone=self.timezone, direction=self.direction)
        self.model_.fit(values, data.timestamps, entities=entities, sensors=sensors)
        self.row_keys_ = {
            (self.model_.entities_[e], self.model_.sensors_[s]): row
            for row, (e, s) in enumerate(zip(self.model_.row_entity_, self.model_.row_sensor_))
        }
        self.fitted_until_ = float(data.timestamps[-1])
        self.fit_warnings_ = []
        if not self.ready_.any():
            self.fit_warnings_.append(
                f"no machine has params.min_history ({self.params.min_history}) of samples in the fit window, so "
                "none is scored until a later fit: wait for more history or lower params.min_history"
            )
        self.faults_ = None
        if self.params.faults is not None:
            self._fit_faults(data)
        return self

    def _fit_faults(self, data: MultiInput) -> None:
        spectra = self._spectra(data, None)
        if spectra is None:
            self.fit_warnings_.append(
                f"the spectrum query returned no band with a numeric {self.params.frequency_label} label for the "
                "machines: no fault signature is scored until a later fit finds some"
            )
            return
        entities, frequencies, cube, speed = spectra
        # An order above the highest band has no amplitude anywhere, which numpy warns about.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.faults_ = FaultSignatures(self.params.faults).fit(cube, frequencies, speed)
        self.fault_entities_, self.frequencies_ = entities, frequencies
        never = np.all(np.isnan(self.faults_.log_mean_), axis=0)
        if never.all():
            self.fit_warnings_.append(
                "no fault order had an amplitude in the fit window, so no fault is scored: check that the speed is "
                f"above 0 in faults.speed_unit ({self.params.faults.speed_unit}) and that the spectrum reaches 1x the "
                "shaft speed"
            )
            return
        for (fault, bearing, order), skipped in zip(self.faults_.orders, never):
            if not skipped:
                continue
            name = f"{fault} of bearing {bearing!r}" if bearing else fault
            self.fit_warnings_.append(
                f"fault {name} (order {order:g}) is not scored: at the fitted speeds its frequency lies above the "
                f"spectrum's highest band, {frequencies[-1]:g} Hz, so add bands up to the order times the shaft speed"
            )

    def _spectra(self, data: MultiInput, fitted: tuple[list[str], np.ndarray] | None):
        """Return (entities, frequencies, spectra (entities, time, bins), speed or None), or None without data."""
        panel = data.panel(SPECTRUM_KEY)
        if not panel.entities:
            return None
        rows_frequency = []
        for labels in panel.labels:
            try:
                rows_frequency.append(float(labels[self.params.frequency_label]))
            except ValueError:
                rows_frequency.append(np.nan)
        rows_frequency = np.array(rows_frequency)
        if fitted is None:
            entities = sorted(set(panel.entities))
            frequencies = np.unique(rows_frequency[np.isfinite(rows_frequency) & (rows_frequency >= 0)])
        else:
            entities, frequencies = fitted
        if frequencies.size == 0 or not entities:
            return None
        entity_index = {name: i for i, name in enumerate(entities)}
        cube = np.full((len(entities), data.timestamps.size, frequencies.size), np.nan)
        for row, entity in enumerate(panel.entities):
            bin_index = np.searchsorted(frequencies, rows_frequency[row])
            if entity in entity_index and bin_index < frequencies.size and frequencies[bin_index] == rows_frequency[row]:
                cube[entity_index[entity], :, bin_index] = panel.values[row]
        speed = None
        speed_panel = data.panel(SPEED_KEY)
        if speed_panel.entities:
            speed = np.full((len(entities), data.timestamps.size), np.nan)
            for row, entity in enumerate(speed_panel.entities):
                if entity in entity_index:
                    speed[entity_index[entity]] = speed_panel.values[row]
        return entities, frequencies, cube, speed

    @property
    def ready_(self) -> np.ndarray:
        """Per fitted machine: True when at least one of its sensors is ready."""
        ready = np.zeros(len(self.model_.entities_), dtype=bool)
        np.logical_or.at(ready, self.model_.row_entity_, self.model_.ready_)
        return ready

    # --- score ---------------------------------------------------------------------------------

    def score(self, data: MultiInput) -> list[EntityResult]:
        values, entities, sensors = self._sensor_rows(data)
        timestamps = data.timestamps
        rows = np.array([self.row_keys_.get(key, -1) for key in zip(entities, sensors)], dtype=np.int64)
        known = rows >= 0
        output = []
        fault_scores = self._fault_scores(data)
        if known.any():
            result = self.model_.score(values[known], timestamps, rows[known])
            known_values = values[known]
            known_sensors = [sensors[i] for i in np.flatnonzero(known)]
            ready = self.ready_
            for e, entity in enumerate(result.entities):
                members = np.flatnonzero(result.row_entity == e)
                if members.size == 0:
                    continue
                last, any_data = last_sample_columns(known_values[members])
                if not any_data.any():
                    continue
                column = int(last[any_data].max())
                samples = []
                for member in members:
                    feature = (("feature", known_sensors[member]),)
                    contribution = result.contribution[member, column]
                    if not np.isnan(contribution):
                        samples.append(Sample("anomaly_contribution_ratio", feature, contribution))
                    if not np.isnan(known_values[member, column]) and not np.isnan(result.expected[member, column]):
                        samples.append(Sample("anomaly_expected", feature, result.expected[member, column]))
                        samples.append(Sample("anomaly_lower", feature, result.lower[member, column]))
                        samples.append(Sample("anomaly_upper", feature, result.upper[member, column]))
                samples += fault_scores.get(entity, [])
                output.append(EntityResult(entity, float(timestamps[column]), bool(ready[e]),
                                           float(result.entity_score[e, column]), tuple(samples)))
        # Machines or sensors the fit did not see are warming until the next fit.
        reported = {result.entity for result in output}
        for entity in sorted(set(entities) - reported):
            members = [i for i, name in enumerate(entities) if name == entity]
            last, any_data = last_sample_columns(values[members])
            if any_data.any():
                output.append(EntityResult(entity, float(timestamps[last[any_data].max()]), False, np.nan))
        return output

    def _fault_scores(self, data: MultiInput) -> dict[str, list[Sample]]:
        """Return the newest fault scores per machine as samples."""
        if self.faults_ is None:
            return {}
        spectra = self._spectra(data, (self.fault_entities_, self.frequencies_))
        if spectra is None:
            return {}
        entities, _, cube, speed = spectra
        scores = self.faults_.score(cube, self.frequencies_, speed)  # (entities, faults, time)
        result = {}
        for e, entity in enumerate(entities):
            has = ~np.all(np.isnan(scores[e]), axis=0)
            if not has.any():
                continue
            column = np.flatnonzero(has)[-1]
            samples = []
            for f, (fault, bearing) in enumerate(zip(self.faults_.faults_, self.faults_.bearings_)):
                if np.isnan(scores[e, f, column]):
                    continue
                labels = (("fault", fault), ("bearing", bearing)) if bearing else (("fault", fault),)
                samples.append(Sample("anomaly_equipment_fault", labels, scores[e, f, column]))
            result[entity] = samples
        return result

    # --- state ---------------------------------------------------------------------------------

    def get_state(self, model_path=None) -> tuple[dict[str, np.ndarray], dict]:
        arrays, model_meta = self.model_.get_state(model_path)
        arrays = prefixed(arrays, "model_")
        meta = {
            "format_version": STATE_FORMAT_VERSION,
            "type": self.type_name,
            "model": model_meta,
            "fitted_until": self.fitted_until_,
            "faults": None,
        }
        if self.faults_ is not None:
            fault_arrays, fault_meta = self.faults_.get_state()
            arrays.update(prefixed(fault_arrays, "faults_"))
            arrays["fault_frequencies"] = self.frequencies_
            meta["faults"] = {"meta": fault_meta, "entities": list(self.fault_entities_)}
        return arrays, meta

    def set_state(self, arrays, meta, model_path=None) -> "EquipmentTypeDetector":
        if meta.get("format_version") != STATE_FORMAT_VERSION or meta.get("type") != self.type_name:
            raise StateError(f"state is for type {meta.get('type')!r}, expected {self.type_name!r}")
        try:
            model = EquipmentDetector(self.params, step=self.step, timezone=self.timezone, direction=self.direction)
            model.set_state(unprefixed(arrays, "model_"), meta["model"], model_path)
            faults = None
            if meta["faults"] is not None:
                if self.params.faults is None:
                    raise StateError("saved state has fault signatures but params.faults is not set")
                faults = FaultSignatures(self.params.faults).set_state(unprefixed(arrays, "faults_"), meta["faults"]["meta"])
                self.fault_entities_ = [str(name) for name in meta["faults"]["entities"]]
                self.frequencies_ = np.asarray(arrays["fault_frequencies"], dtype=np.float64)
                if faults.log_mean_.shape[0] != len(self.fault_entities_):
                    raise StateError("saved fault baselines do not match the saved machines")
            fitted_until = float(meta["fitted_until"])
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, StateError):
                raise
            raise StateError(f"state is incomplete or malformed: {error}") from None
        self.model_, self.faults_ = model, faults
        self.row_keys_ = {
            (model.entities_[e], model.sensors_[s]): row for row, (e, s) in enumerate(zip(model.row_entity_, model.row_sensor_))
        }
        self.fitted_until_ = fitted_until
        return self
