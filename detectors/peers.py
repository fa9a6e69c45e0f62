"""Peer groups of tenants: KMeans on profile summaries, with group ids that survive refits.

Grouping needs only one summary vector per tenant (level, spread, 95th percentile and daily
shape of each metric), which PromQL can compute with ``quantile_over_time`` and friends, so
any shard can group tenants it does not score. ``profile_features`` computes the same summary
from a (tenants, metrics, time) cube.

A tenant's peer score compares how far its metrics are from its own typical level now (on a
log scale) with the same change of the other tenants in its group at the same moment. The
unit is the group's robust standard deviation times ``band_sigmas``, so 1 is a warning and 2
critical, as for every other score. An IsolationForest
over the group-relative vectors of all tenants flags cross-tenant outliers.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.ensemble import IsolationForest
from sklearn.metrics import silhouette_score

from detectors._stats import MAD_TO_SIGMA, grouped_row_median, row_quantiles
from detectors.base import STATE_FORMAT_VERSION, StateError

# Summary statistics per metric ahead of the daily shape blocks, in feature order.
SUMMARY_STATISTICS = ("level", "spread", "p95")

# Tenants sampled for the silhouette, which costs O(n^2).
SILHOUETTE_SAMPLE = 2000


class PeerParams(BaseModel):
    """Parameters of peer grouping and peer scoring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_groups: int | None = Field(default=None, ge=1)
    """Fixed number of groups; None chooses it by silhouette within ``min_groups``..``max_groups``."""

    min_groups: int = Field(default=2, ge=2)
    max_groups: int = Field(default=8, ge=2)

    shape_blocks: int = Field(default=6, ge=1, le=48)
    """Blocks of the local day in the daily shape features; must divide 24 hours evenly."""

    band_sigmas: float = Field(default=3.0, gt=0)
    """Robust standard deviations of the group at which the peer score is 1."""

    min_sigma: float = Field(default=0.05, gt=0)
    """Floor of a group's spread, in natural-log units (0.05 is about 5 %)."""

    min_group_size: int = Field(default=4, ge=2)
    """Groups with fewer tenants get no peer score (NaN)."""

    outlier_threshold: float = Field(default=0.62, gt=0, lt=1)
    """IsolationForest anomaly score (-score_samples, 0.5 is typical) at which a tenant is an outlier."""

    random_state: int = 0

    @model_validator(mode="after")
    def _check_ranges(self) -> "PeerParams":
        if self.min_groups > self.max_groups:
            raise ValueError(f"min_groups {self.min_groups} is above max_groups {self.max_groups}")
        if 24 % self.shape_blocks:
            raise ValueError(f"shape_blocks {self.shape_blocks} must divide 24 hours evenly, such as 4, 6 or 8")
        return self


@dataclass(frozen=True)
class PeerScores:
    """Peer results for the tenants passed to ``PeerGroups.score``, in that order."""

    group: np.ndarray
    """Stable group id per tenant (int)."""
    score: np.ndarray
    """Peer score per tenant: 0 like its group, 1 warning, 2 critical; NaN in a group too small."""
    deviation: np.ndarray
    """Signed deviation from the group per (tenant, metric) in robust standard deviations."""
    outlier_score: np.ndarray
    """IsolationForest anomaly score (-score_samples) over all tenants' group-relative vectors."""
    outlier: np.ndarray
    """True where ``outlier_score`` reaches ``outlier_threshold``."""


def signed_log(values: np.ndarray) -> np.ndarray:
    """Compress magnitudes so that bytes, cores and ratios spread alike: sign(x) log(1 + |x|)."""
    return np.sign(values) * np.log1p(np.abs(values))


def profile_features(cube: np.ndarray, timestamps: np.ndarray, *, shape_blocks: int = 6, timezone: str = "UTC") -> np.ndarray:
    """Summarise a (tenants, metrics, time) cube as one profile vector per tenant.

    Per metric: the signed log of the median, the interquartile range and the 95th percentile,
    then ``shape_blocks`` daily shape values, each the median in one block of the local day
    minus the overall median, divided by the 5th-to-95th percentile range. Metrics a tenant
    lacks are NaN. Returns shape (tenants, metrics * (3 + shape_blocks)).
    """
    n_tenants, n_metrics, width = cube.shape
    rows = cube.reshape(n_tenants * n_metrics, width)
    q05, q25, q50, q75, q95 = row_quantiles(rows, [0.05, 0.25, 0.5, 0.75, 0.95]).T
    local = pd.to_datetime(np.asarray(timestamps), unit="s", utc=True).tz_convert(timezone)
    hours = local.hour.to_numpy() + local.minute.to_numpy() / 60.0
    block = (hours // (24 / shape_blocks)).astype(np.int64)
    block_median = grouped_row_median(rows, block, shape_blocks)
    with np.errstate(invalid="ignore", divide="ignore"):
        span = np.maximum(q95 - q05, 1e-9 * np.maximum(np.abs(q50), 1.0))
        shape = (block_median - q50[:, None]) / span[:, None]
    summary = np.stack([signed_log(q50), signed_log(q75 - q25), signed_log(q95)], axis=1)
    features = np.concatenate([summary, shape], axis=1)
    return features.reshape(n_tenants, n_metrics * (len(SUMMARY_STATISTICS) + shape_blocks))


def current_vectors(cube: np.ndarray) -> np.ndarray:
    """Return each tenant's current level per metric: the signed log of the median over the cube's time axis.

    Pass the newest few samples (for example the last 15 minutes) to damp single-sample noise.
    """
    n_tenants, n_metrics, width = cube.shape
    median = row_quantiles(cube.reshape(-1, width), [0.5])[:, 0]
    return signed_log(median).reshape(n_tenants, n_metrics)


class PeerGroups:
    """KMeans peer groups on standardised tenant profiles, with ids matched across refits.

    Parameters
    ----------
    params : PeerParams
        ``n_groups`` or the silhouette range sets k; ``band_sigmas`` and ``min_sigma`` set
        the peer score's scale.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> profiles = np.concatenate([rng.normal(0, 0.1, (10, 4)), rng.normal(3, 0.1, (10, 4))])
    >>> names = [f"t{i}" for i in range(20)]
    >>> peers = PeerGroups(PeerParams(shape_blocks=1)).fit(profiles, names)
    >>> peers.n_groups_, len(set(peers.groups_[:10])), bool(peers.groups_[0] != peers.groups_[10])
    (2, 1, True)
    >>> refit = PeerGroups(PeerParams(shape_blocks=1, random_state=7)).fit(profiles[::-1], names[::-1], previous=peers)
    >>> refit.group_of(names).tolist() == peers.group_of(names).tolist()
    True
    """

    def __init__(self, params: PeerParams):
        self.params = params

    def fit(self, profiles: np.ndarray, tenants, *, previous: "PeerGroups | None" = None) -> "PeerGroups":
        """Cluster tenants on their profile vectors; reuse ``previous``'s group ids for matching clusters."""
        profiles = np.asarray(profiles, dtype=np.float64)
        tenants = tuple(str(name) for name in tenants)
        if profiles.ndim != 2 or profiles.shape[0] != len(tenants):
            raise ValueError(f"profiles must be (tenants, features) with one row per tenant, got {profiles.shape}")
        if len(set(tenants)) != len(tenants):
            raise ValueError("duplicate tenant ids in the profiles: expected one row per tenant")
        if len(tenants) < 2:
            raise ValueError(f"peer groups need at least 2 tenants, got {len(tenants)}")

        # Robust standardisation per feature; a constant feature keeps scale 1 and is ignored in effect.
        finite = np.where(np.isfinite(profiles), profiles, np.nan)
        low, centre, high = row_quantiles(finite.T, [0.25, 0.5, 0.75]).T
        scale = (high - low) / 1.349
        self.centre_ = np.nan_to_num(centre)
        self.scale_ = np.where(np.isfinite(scale) & (scale > 1e-9), scale, 1.0)
        standard = self._standardise(finite)

        k = self._choose_k(standard)
        model = KMeans(n_clusters=k, n_init=4, random_state=self.params.random_state).fit(standard)
        # Centroids are kept in the raw feature space, so a later refit with another scaling
        # can still compare them.
        self.centroids_ = model.cluster_centers_ * self.scale_ + self.centre_
        self.group_ids_ = self._match_ids(previous)
        self.next_id_ = int(max(self.group_ids_.max() + 1, previous.next_id_ if previous is not None else 0))
        self.tenants_ = tenants
        self.levels_ = self.profile_levels(profiles)
        self.groups_ = self.group_ids_[model.labels_]
        self.n_groups_ = k
        return self

    def profile_levels(self, profiles: np.ndarray) -> np.ndarray:
        """Return the level feature of each metric, shape (tenants, metrics), from profile vectors."""
        per_metric = len(SUMMARY_STATISTICS) + self.params.shape_blocks
        if profiles.shape[1] % per_metric:
            raise ValueError(
                f"profiles have {profiles.shape[1]} features, expected a multiple of {per_metric} "
                f"(3 statistics and {self.params.shape_blocks} shape blocks per metric)"
            )
        return profiles[:, SUMMARY_STATISTICS.index("level") :: per_metric]

    def _standardise(self, profiles: np.ndarray) -> np.ndarray:
        return np.nan_to_num((profiles - self.centre_) / self.scale_, nan=0.0)

    def _choose_k(self, standard: np.ndarray) -> int:
        n_tenants = standard.shape[0]
        if self.params.n_groups is not None:
            return min(self.params.n_groups, n_tenants)
        best_k, best_score = 1, -np.inf
        sample = min(n_tenants, SILHOUETTE_SAMPLE)
        for k in range(self.params.min_groups, min(self.params.max_groups, n_tenants - 1) + 1):
            labels = KMeans(n_clusters=k, n_init=2, random_state=self.params.random_state).fit_predict(standard)
            if np.unique(labels).size < 2:
                continue
            value = silhouette_score(standard, labels, sample_size=sample, random_state=self.params.random_state)
            if value > best_score:
                best_k, best_score = k, value
        return best_k

    def _match_ids(self, previous: "PeerGroups | None") -> np.ndarray:
        """Give each new cluster the id of the previous cluster it matches (Hungarian matching).

        Distances are measured in this fit's standardised space. Clusters left without a
        partner get fresh ids, above every id used before.

        NOTE: while previous ids remain, a new cluster takes one however far apart their
        centroids are. There is no distance threshold yet.
        """
        k = self.centroids_.shape[0]
        if previous is None:
            return np.arange(k)
        if previous.centroids_.shape[1] != self.centroids_.shape[1]:
            raise ValueError(
                f"previous peer groups have {previous.centroids_.shape[1]} features, these have "
                f"{self.centroids_.shape[1]}: fit without previous when the metrics change"
            )
        new = (self.centroids_ - self.centre_) / self.scale_
        old = (previous.centroids_ - self.centre_) / self.scale_
        cost = np.linalg.norm(new[:, None, :] - old[None, :, :], axis=2)
        new_index, old_index = linear_sum_assignment(cost)
        ids = np.full(k, -1)
        ids[new_index] = previous.group_ids_[old_index]
        unmatched = np.flatnonzero(ids < 0)
        ids[unmatched] = previous.next_id_ + np.arange(unmatched.size)
        return ids

    def assign(self, profiles: np.ndarray) -> np.ndarray:
        """Return the group id of the nearest centroid for each profile vector."""
        standard = self._standardise(np.asarray(profiles, dtype=np.float64))
        centroids = (self.centroids_ - self.centre_) / self.scale_
        distance = np.linalg.norm(standard[:, None, :] - centroids[None, :, :], axis=2)
        return self.group_ids_[np.argmin(distance, axis=1)]

    def group_of(self, tenants) -> np.ndarray:
        """Return the fitted group id per tenant, -1 for tenants the fit did not see."""
        index = {name: position for position, name in enumerate(self.tenants_)}
        return np.array([self.groups_[index[name]] if name in index else -1 for name in tenants], dtype=np.int64)

    def score(
        self,
        current: np.ndarray,
        tenants,
        *,
        groups: np.ndarray | None = None,
        levels: np.ndarray | None = None,
    ) -> PeerScores:
        """Score each tenant's current vector (tenants, metrics) against the others of its group.

        ``current`` comes from ``current_vectors`` over the same newest samples for every
        tenant. What is compared is the change from the tenant's own typical level (its
        profile's level feature). A big tenant is therefore no outlier among small peers for
        its size alone, and a change that the whole group shares scores 0. ``groups`` and
        ``levels`` default to the fitted values of each tenant; pass ``assign(profiles)`` and
        ``profile_levels(profiles)`` for tenants that appeared after the fit.
        """
        current = np.asarray(current, dtype=np.float64)
        tenants = list(tenants)
        if current.ndim != 2 or current.shape[0] != len(tenants):
            raise ValueError(f"current must be (tenants, metrics) with one row per tenant, got {current.shape}")
        groups = self.group_of(tenants) if groups is None else np.asarray(groups, dtype=np.int64)
        if levels is None:
            index = {name: position for position, name in enumerate(self.tenants_)}
            levels = np.full(current.shape, np.nan)
            known = [i for i, name in enumerate(tenants) if name in index]
            levels[known] = self.levels_[[index[tenants[i]] for i in known]]
        levels = np.asarray(levels, dtype=np.float64)
        if levels.shape != current.shape:
            raise ValueError(f"levels must have the shape of current {current.shape}, got {levels.shape}")
        change = current - levels

        deviation = np.full(current.shape, np.nan)
        for group in np.unique(groups[groups >= 0]):
            members = groups == group
            if np.count_nonzero(members) < self.params.min_group_size:
                continue
            middle = row_quantiles(change[members].T, [0.5])[:, 0]
            absolute = np.abs(change[members] - middle)
            mad = row_quantiles(absolute.T, [0.5])[:, 0]
            sigma = np.fmax(MAD_TO_SIGMA * mad, self.params.min_sigma)
            deviation[members] = (change[members] - middle) / sigma

        has_any = ~np.all(np.isnan(deviation), axis=1)
        score = np.where(has_any, np.nanmax(np.abs(np.where(has_any[:, None], deviation, 0.0)), axis=1), np.nan)
        score = score / self.params.band_sigmas
        outlier_score = self._outlier_scores(deviation)
        return PeerScores(
            group=groups,
            score=score,
            deviation=deviation,
            outlier_score=outlier_score,
            outlier=outlier_score >= self.params.outlier_threshold,
        )

    def _outlier_scores(self, deviation: np.ndarray) -> np.ndarray:
        """Fit an IsolationForest on this moment's group-relative vectors and return -score_samples.

        The forest is fitted per call on the current cross-section, so it keeps no state.
        """
        vectors = np.clip(np.nan_to_num(deviation, nan=0.0), -10 * self.params.band_sigmas, 10 * self.params.band_sigmas)
        if vectors.shape[0] < 2:
            return np.zeros(vectors.shape[0])
        forest = IsolationForest(n_estimators=100, random_state=self.params.random_state).fit(vectors)
        return -forest.score_samples(vectors)

    # --- state ---------------------------------------------------------------------------------

    def get_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Return the groups as arrays and JSON; KMeans itself is not stored, only its centroids."""
        arrays = {
            "centroids": self.centroids_,
            "centre": self.centre_,
            "scale": self.scale_,
            "group_ids": self.group_ids_,
            "groups": self.groups_,
            "levels": self.levels_,
        }
        meta = {
            "format_version": STATE_FORMAT_VERSION,
            "type": "peer_groups",
            "tenants": list(self.tenants_),
            "next_id": self.next_id_,
        }
        return arrays, meta

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict) -> "PeerGroups":
        """Restore groups saved by ``get_state``; raises StateError when the state is inconsistent."""
        if meta.get("format_version") != STATE_FORMAT_VERSION or meta.get("type") != "peer_groups":
            raise StateError(
                f"state is for type {meta.get('type')!r} format {meta.get('format_version')!r}, "
                f"expected 'peer_groups' format {STATE_FORMAT_VERSION}"
            )
        try:
            centroids = np.asarray(arrays["centroids"], dtype=np.float64)
            centre = np.asarray(arrays["centre"], dtype=np.float64)
            scale = np.asarray(arrays["scale"], dtype=np.float64)
            group_ids = np.asarray(arrays["group_ids"], dtype=np.int64)
            groups = np.asarray(arrays["groups"], dtype=np.int64)
            levels = np.asarray(arrays["levels"], dtype=np.float64)
            tenants = tuple(str(name) for name in meta["tenants"])
            next_id = int(meta["next_id"])
        except (KeyError, TypeError, ValueError) as error:
            raise StateError(f"state is incomplete or malformed: {error}") from None

        if centroids.ndim != 2 or centre.shape != (centroids.shape[1],) or scale.shape != centre.shape:
            raise StateError(f"state centroids {centroids.shape}, centre {centre.shape} and scale {scale.shape} do not fit together")
        if group_ids.shape != (centroids.shape[0],) or groups.shape != (len(tenants),):
            raise StateError("state group ids do not match the number of centroids or tenants")
        if levels.ndim != 2 or levels.shape[0] != len(tenants):
            raise StateError(f"state array 'levels' has shape {levels.shape}, expected ({len(tenants)}, metrics)")
        if not set(groups.tolist()) <= set(group_ids.tolist()) or next_id <= group_ids.max(initial=-1):
            raise StateError("state groups use ids that the centroids do not have")
        if not (np.all(np.isfinite(centroids)) and np.all(np.isfinite(centre)) and np.all(scale > 0)):
            raise StateError("invalid state: non-finite centroids or non-positive scales")

        self.centroids_, self.centre_, self.scale_ = centroids, centre, scale
        self.group_ids_, self.groups_, self.tenants_ = group_ids, groups, tenants
        self.levels_ = levels
        self.next_id_, self.n_groups_ = next_id, centroids.shape[0]
        return self
