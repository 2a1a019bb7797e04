"""The M-TIP generation as a solver: one method per stage, composed by :meth:`MTIPSolver.step`.

SPMD: every rank runs every stage on its own shard of images; the collectives are in
:mod:`spinifel.parallel`. Data flow of one generation::

    orient()   model (state.full / state.halves) + local images --> Assignment
               (per local image: orientations (n, 4), grid index (n,); with
               algorithm.score = "poisson" also the sparse orientation posterior)
    merge()    Assignment + local images --(type-1 NUFFTs, Allreduce, CG, L-curve)--> Merged
    phase()    Merged --(phasing jobs on their owner ranks, Bcast)--> list of Phased
    advance()  --> new SolverState (+ convergence) and the StepReport the handlers read

Generation 0 merges with the initial (seeded random or true) orientations. Every random
choice derives from ``runtime.seed`` and the generation number, never from the rank, so the
result does not depend on the number of ranks beyond round-off.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from spinifel.backend.arrays import fft_workers, to_host, to_module
from spinifel.backend.select import release_memory_pool
from spinifel.config import Config
from spinifel.geometry.resolution import matching_cutoff, matching_fraction
from spinifel.merging.merge import (
    accumulate_normal_equations,
    add_normal_equations,
    merge,
    solve_each,
)
from spinifel.merging.probabilistic import accumulate_posterior_normal_equations
from spinifel.orientation.matching import (
    match_distributed,
    match_orientations,
    refine_orientations,
)
from spinifel.orientation.slicing import Slicer
from spinifel.parallel.collectives import (
    allreduce_sum,
    bcast_array,
    gather_objects,
    quiet_wait,
    reduce_summary,
)
from spinifel.phasing.algorithms import intensity_from_autocorrelation
from spinifel.pipeline.poisson import (
    combine_posteriors,
    extend_background,
    one_hot_posterior,
    posterior_rows,
    posterior_to_host,
)
from spinifel.pipeline.problem import Problem
from spinifel.pipeline.state import ChainState, SolverState
from spinifel.pipeline.timer import StageTimer

log = logging.getLogger("spinifel")


# Warn when the density (after phasing) or the merged autocorrelation (within its support)
# reaches its box's edge with more than this fraction of its maximum (issue 13, item 6).
EDGE_WARNING = 0.05


def matching_resolution(generation: int, a) -> float:
    """Fraction of the largest ``|s|`` of the detector that sets the matching cutoff of
    ``generation`` (>= 1); :func:`spinifel.geometry.resolution.matching_cutoff` turns it into
    a number of measured pixels."""
    return matching_fraction(generation, a.match_resolution_start, a.match_resolution_ramp)


def model_scale(model_ac: np.ndarray, data_ac: np.ndarray, fourier_mask: np.ndarray) -> float:
    """Least-squares factor ``c`` minimising ``||c I_model - I_data||`` over ``fourier_mask``."""
    k = np.fft.ifftshift(fourier_mask)
    im = np.fft.fftn(np.fft.ifftshift(model_ac)).real[k]
    idata = np.fft.fftn(np.fft.ifftshift(data_ac)).real[k]
    den = float(np.dot(im, im))
    return float(np.dot(im, idata) / den) if den > 0 else 1.0


def phase_chain(cfg: Config, ac: np.ndarray, chain: ChainState | None, generation: int,
                fourier_mask: np.ndarray | None, stream: int = 0, xp: Any = np):
    """Phase ``ac`` (warm start from ``chain``; a random start when it has no density).

    ``stream`` separates the random starts of the full map (0), the half maps (1, 2) and
    the PRTF runs; seeds never depend on the rank.
    """
    from spinifel.phasing.phase import phase

    a = cfg.algorithm
    seed = [cfg.runtime.seed, generation, 17] + ([stream] if stream else [])
    rng = np.random.default_rng(seed)
    # Phasing runs on the array module xp (on the GPU path, on the device), in float64 like
    # the merge: single precision halves its time but cost 0.016 of density correlation on
    # the demo (0.855 vs 0.871, same orientations), so it is not the default.
    return phase(to_module(ac, xp, np.float64), n_loops=a.n_phase_loops, n_er=a.n_er,
                 n_hio=a.n_hio, beta=a.hio_beta, sw_sigma=a.shrinkwrap_sigma,
                 sw_threshold=a.shrinkwrap_threshold, n_final_er=a.n_final_er, rng=rng,
                 rho0=None if chain is None else chain.density,
                 support0=None if chain is None else chain.support,
                 fourier_mask=fourier_mask)


@dataclass
class Assignment:
    """Output of the orientation stage, input of the merge (this rank's images).

    Attributes
    ----------
    orientations : ndarray (n_local, 4) float64
        Orientation of each local image (host).
    index : ndarray (n_local,) int64 or None
        Grid index of each image's best match (with a posterior: its most likely
        orientation); None when nothing was matched (generation 0, ``use_true_orientations``).
    weights : ndarray or None
        Reserved; None (the probabilistic assignment is ``posterior``).
    independent : bool
        Each half set was matched against its own half map only.
    posterior : spinifel.orientation.likelihood.Posterior or None
        ``algorithm.score = "poisson"``: the sparse orientation posterior of the local images
        (host arrays); the merge uses it instead of ``orientations``. None: hard assignment.
    background : tuple (ndarray (P,) float64, float) or None
        Background per good pixel (photons) and the mean fluence it was fitted with,
        estimated after this scoring (``algorithm.background``; identical on every rank).
    metrics : dict or None
        :func:`~spinifel.orientation.likelihood.posterior_metrics` over all ranks (the
        ``"posterior"`` entry of ``metrics.json``).
    posterior_grid : ndarray (J', 4) float64 or None
        The orientations ``posterior.indices`` point into when they are not the problem's
        grid: after likelihood refinement, the refined orientation of every local image
        (a one-hot posterior, image ``i`` at row ``i``). None: the problem's grid.
    """

    orientations: np.ndarray
    index: np.ndarray | None = None
    weights: np.ndarray | None = None
    independent: bool = False
    posterior: Any = None
    background: tuple[np.ndarray, float] | None = None
    metrics: dict | None = None
    posterior_grid: np.ndarray | None = None


@dataclass
class Merged:
    """Output of the merge: the full map's :class:`~spinifel.merging.merge.MergeResult`
    (autocorrelation on the host) and the half maps' autocorrelations (or None)."""

    result: Any
    halves: list[np.ndarray] | None = None


@dataclass
class Phased:
    """One phasing job's output, on every rank: density (M, M, M) float64, support bool,
    phased autocorrelation rescaled to the data (float64), the Fourier error (owner rank
    only; None elsewhere)."""

    density: np.ndarray
    support: np.ndarray
    phased_ac: np.ndarray
    fourier_error: float | None


@dataclass
class StepReport:
    """What a step hands to the handlers (every rank).

    ``entry`` is the generation's metrics dict (``metrics.json``); ``orientations`` every
    image's orientations in file order and ``intensity`` the merged intensity, both on
    rank 0 only (None elsewhere); ``timings`` is ``entry["timings"]``.
    """

    generation: int
    entry: dict
    assignment: Assignment
    converged: bool
    last: bool
    orientations: np.ndarray | None = None
    intensity: np.ndarray | None = None
    timings: dict = field(default_factory=dict)


Handler = Callable[["MTIPSolver", StepReport], None]


class MTIPSolver:
    """M-TIP generations over a :class:`Problem` from a :class:`SolverState` (collective).

    ``step()`` runs one generation: :meth:`orient`, :meth:`merge`, :meth:`phase`,
    :meth:`advance`. ``evolve(handlers)`` steps while :attr:`proceed` and calls every
    handler after each step on every rank.
    """

    def __init__(self, problem: Problem, state: SolverState) -> None:
        self.problem = problem
        self.state = state
        self.cfg = problem.cfg
        self.comm = problem.ctx.comm
        self.timings: dict[str, float] = {}
        M = self.cfg.algorithm.M
        self._zeros = np.zeros((M, M, M))
        self._warned: set[str] = set()

    # ---------------------------------------------------------------- control
    @property
    def generation(self) -> int:
        """The generation the next step runs."""
        return self.state.generation + 1

    @property
    def proceed(self) -> bool:
        """False once the last generation ran or the run converged."""
        return self.generation < self.cfg.algorithm.generations and not self.state.converged

    def evolve(self, handlers: Iterable[Handler] = ()) -> None:
        """Step until :attr:`proceed` is False, calling ``handlers`` after each step."""
        handlers = list(handlers)
        while self.proceed:
            report = self.step()
            for h in handlers:
                h(self, report)

    def step(self) -> StepReport:
        """One generation: orient, merge, phase, advance (collective)."""
        self.timings = {}
        assignment = self.orient()
        changed = self.orientation_change(assignment)
        merged = self.merge(assignment)
        phased = self.phase(merged)
        return self.advance(assignment, merged, phased, changed)

    # ---------------------------------------------------------------- stages
    def orient(self) -> Assignment:
        """Orientations of the local images against the current model (collective in the
        distributed matching mode). Generation 0 and ``use_true_orientations`` keep the
        state's orientations."""
        p, a, g, st = self.problem, self.cfg.algorithm, self.generation, self.state
        if g == 0 or a.use_true_orientations:
            return Assignment(orientations=st.orientations)
        xp = p.xp
        sel = p.s_norm <= matching_cutoff(g, p.s_norm, p.s_all, start=a.match_resolution_start,
                                          ramp=a.match_resolution_ramp)
        d_sel = to_module(sel, xp)
        m_images = p.images if sel.all() else xp.ascontiguousarray(p.images[:, d_sel])
        positions = p.d_positions[:, d_sel]
        independent = (st.halves is not None and self.cfg.validation.half_sets == "independent"
                       and g >= a.match_resolution_ramp and st.halves[0].phased_ac is not None)
        if a.score == "poisson":
            return self.orient_poisson(m_images, positions, sel, independent)
        if independent:
            # Gold standard: each half is matched against its own half map only.
            best = np.empty(p.n_local, dtype=np.int64)
            quats = np.empty((p.n_local, 4))
            for h, (mine, d_mine) in enumerate(p.half_rows):
                best[mine], quats[mine] = self.assign_orientations(
                    st.halves[h].phased_ac, m_images[d_mine], positions)
        else:
            best, quats = self.assign_orientations(st.full.phased_ac, m_images, positions)
        m_images = None  # the slices' memory, before the merge's buffers
        release_memory_pool(xp)
        return Assignment(orientations=quats, index=best, independent=independent)

    def orient_poisson(self, images: Any, positions: Any, sel: np.ndarray,
                       independent: bool) -> Assignment:
        """The Poisson branch of :meth:`orient` (collective): posteriors of ``images`` (the
        local photon counts at the ``sel`` pixels, positions ``positions``), the hard
        orientation of each image (its most likely one), the background estimate and the
        posterior metrics over all ranks."""
        from spinifel.orientation.likelihood import posterior_metrics

        p, st = self.problem, self.state
        refined = None
        if independent:
            parts = [self.score(st.halves[h].phased_ac, images[d_mine], positions, sel, mine)
                     for h, (mine, d_mine) in enumerate(p.half_rows)]
            post = combine_posteriors([pt for pt, _ in parts], [mine for mine, _ in p.half_rows],
                                      p.n_local)
            if parts[0][1] is not None:
                refined = np.empty((p.n_local, 4))
                for (mine, _), (_, q) in zip(p.half_rows, parts):
                    refined[mine] = q
        else:
            post, refined = self.score(st.full.phased_ac, images, positions, sel)
        images = None
        release_memory_pool(p.xp)
        background = self.estimate_background(post, sel)
        metrics = posterior_metrics(reduce_summary(self.comm, post.summary()), post.beta)
        if background is not None:
            metrics["background_photons_per_pixel"] = float(np.mean(background[0]))
            metrics["background_fluence"] = background[1]
        index = post.indices[:, 0].astype(np.int64)
        if refined is not None:  # one orientation per image, off the grid
            return Assignment(orientations=refined, index=index, independent=independent,
                              posterior=one_hot_posterior(post), background=background,
                              metrics=metrics, posterior_grid=refined)
        return Assignment(orientations=p.grid[index], index=index, independent=independent,
                          posterior=post, background=background, metrics=metrics)

    def score(self, model_ac: np.ndarray, images: Any, positions: Any, sel: np.ndarray,
              rows: np.ndarray | None = None):
        """Poisson posterior of ``images`` against the slices of ``model_ac`` (this rank).

        ``rows`` (host mask of the local images) selects the previous fluences of
        ``algorithm.fluence = "emc"``. The slices are the model's intensity on the data's
        scale (the merge's photons at fluence 1; phasing keeps that scale, see
        :meth:`_share`). The score adds ``background / fluence`` of the previous
        generation's estimate, if any. The returned posterior is on the host, its
        ``fluence`` the EMC update ``N_k / sum_j P_kj S_j`` (the merge's and the next
        scoring's). Adds "slicing" and "matching" to the timings.
        """
        import time

        from spinifel.orientation.background import background_per_fluence
        from spinifel.orientation.likelihood import (
            posterior_settings,
            score_orientations,
            update_fluence,
        )

        p, a, st, timings = self.problem, self.cfg.algorithm, self.state, self.timings
        t = time.perf_counter()
        slicing_before = timings.get("slicing", 0.0)
        settings = posterior_settings(a, self.generation)
        slicer = Slicer(model_ac, positions, p.extent, a.nufft_eps_slicing, p.real,
                        self.cfg.runtime.threads_per_rank)
        bg = None
        if st.background is not None:
            bg = background_per_fluence(st.background[0][sel], st.background[1], like=images)
        fluence = None if settings["fit_scale"] else self._emc_fluence(images, slicer, rows)
        if a.search == "polar":
            post = self._score_polar(model_ac, images, positions, fluence, settings)
        else:
            post = score_orientations(images, _timed_batches(slicer, p.grid, p.orientation_batch,
                                                             timings),
                                      fluence=fluence, image_batch=p.image_batch,
                                      background_per_fluence=bg, n_orientations=len(p.grid),
                                      **settings)
        n_photons = p.xp.sum(images, axis=1, dtype=np.float64)
        post.fluence = update_fluence(n_photons, post.expected_slice_sum)
        timings["matching"] = (timings.get("matching", 0.0) + time.perf_counter() - t
                               - (timings.get("slicing", 0.0) - slicing_before))
        post = posterior_to_host(post)
        refined = None
        if self.refining(settings["beta"]):
            with StageTimer(timings, "refinement"):
                refined = self.refine_likelihood(images, post, slicer, settings, fluence, bg)
        return post, refined

    def refining(self, beta: float) -> bool:
        """Whether this generation refines orientations off the grid: one of the last
        ``refine_generations`` with ``refine_rounds > 0`` and, under the Poisson score, the
        annealing finished (``beta == beta_end``: refinement keeps one orientation per image,
        the limit of a posterior at full inverse temperature)."""
        a = self.cfg.algorithm
        if a.refine_rounds <= 0 or self.generation < a.generations - a.refine_generations:
            return False
        return a.score != "poisson" or beta >= a.beta_end

    def refine_likelihood(self, images: Any, post: Any, slicer: Slicer, settings: dict,
                          fluence: Any, bg: Any) -> np.ndarray:
        """Each image's most likely grid orientation refined off the grid by maximising its
        Poisson log-likelihood (the score of the grid search, same fluence and background;
        :func:`~spinifel.orientation.matching.refine_orientations`). Returns ``(n, 4)`` on
        the host."""
        from spinifel.geometry.orientations import grid_spacing
        from spinifel.orientation.likelihood import candidate_log_likelihood

        a, p = self.cfg.algorithm, self.problem
        phi = None if fluence is None else to_module(fluence, p.xp)

        def minus_log_likelihood(rows: slice, slices: Any, k: int) -> Any:
            return -candidate_log_likelihood(
                images[rows], slices, k, fluence=None if phi is None else phi[rows],
                fit_scale=settings["fit_scale"], floor_rel=settings["floor_rel"],
                background_per_fluence=bg)

        start = p.grid[post.indices[:, 0].astype(np.int64)]
        quats, _ = refine_orientations(images, start, slicer, 0.5 * grid_spacing(a.n_orientations),
                                       a.refine_rounds, stencil=a.refine_stencil,
                                       scorer=minus_log_likelihood)
        return quats

    def _polar_setup(self, model_ac: np.ndarray, positions: Any, interpolation: str | None):
        """Polar grid of the matched pixels, its slicer of ``model_ac`` (timed as slicing),
        the beam directions and the directions per batch (about as many model values as
        ``orientation_batch`` ordinary slices). ``interpolation``: ``"nearest"`` for photon
        counts, None for the default (bilinear)."""
        from spinifel.orientation.polar import (
            PolarSlicer,
            direction_quaternions,
            fibonacci_directions,
            make_polar_grid,
        )

        p, a = self.problem, self.cfg.algorithm
        n_dir, n_psi = p.polar_sizes
        pos = to_host(positions)
        with StageTimer(self.timings, "slicing"):
            pg = (make_polar_grid(pos, n_psi) if interpolation is None
                  else make_polar_grid(pos, n_psi, interpolation=interpolation))
            polar = PolarSlicer(model_ac, pg, p.extent, a.nufft_eps_slicing, p.real,
                                self.cfg.runtime.threads_per_rank)
        dirs = direction_quaternions(fibonacci_directions(n_dir))
        batch = max(1, min(n_dir, p.orientation_batch * pos.shape[1] // pg.n_points))
        return pg, polar, dirs, batch

    def _score_polar(self, model_ac: np.ndarray, images: Any, positions: Any, fluence: Any,
                     settings: dict) -> Any:
        """The Poisson posterior by the polar search (host arrays; no background, refused
        by the config): photons binned to their nearest polar bin, every in-plane angle's
        log-likelihood by FFT (:func:`~spinifel.orientation.polar.score_polar`)."""
        from spinifel.orientation.polar import score_polar

        p = self.problem
        pg, polar, dirs, batch = self._polar_setup(model_ac, positions, "nearest")
        return score_polar(to_host(images), pg, _timed_batches(polar, dirs, batch, self.timings),
                           fluence=None if fluence is None else to_host(fluence),
                           image_batch=min(p.image_batch, 512), dtype=p.real, **settings)

    def _emc_fluence(self, images: Any, slicer: Slicer, rows: np.ndarray | None) -> Any:
        """``algorithm.fluence = "emc"``: the previous scoring's fluences of these images,
        or in the first scoring the photon-count ratio to the mean slice sum of the first
        orientation batch."""
        from spinifel.orientation.likelihood import initial_fluence, log_slices

        p, st, xp = self.problem, self.state, self.problem.xp
        if st.fluence is not None:
            return to_module(st.fluence if rows is None else st.fluence[rows], xp)
        first = slicer.slices(p.grid[:p.orientation_batch])
        _, sums = log_slices(first, self.cfg.algorithm.likelihood_floor)
        return initial_fluence(xp.sum(images, axis=1, dtype=np.float64), float(xp.mean(sums)))

    def estimate_background(self, post: Any, sel: np.ndarray) -> tuple[np.ndarray, float] | None:
        """Background per good pixel from the mean image and the model's orientation average
        (``post.mean_slice``, at the ``sel`` pixels; ``flat`` and ``radial``: the data's
        estimate ``problem.data_background`` when there is one, only the fluence from the
        model),
        extended to every good pixel by shell;
        None when ``algorithm.background = "none"``. Identical on every rank."""
        from spinifel.orientation.background import estimate_background

        p, a = self.problem, self.cfg.algorithm
        if a.background == "none" or post.mean_slice is None:
            return None
        data = p.data_background
        if data is not None and np.ndim(data) == 1:  # radial: per shell -> per pixel
            data = np.asarray(data)[p.shells[sel]]
        b_sel, phi_ref = estimate_background(p.mean_image[sel], post.mean_slice, a.background,
                                             p.shells[sel], from_data=data)
        return extend_background(b_sel, p.shells[sel], p.shells), phi_ref

    def warn_edge(self, kind: str, volume: np.ndarray, support: np.ndarray | None = None
                  ) -> None:
        """Warn once per run (rank 0) when ``volume`` reaches the edge of its box or support
        (:func:`spinifel.geometry.box.support_touches_edge` above :data:`EDGE_WARNING`).
        Not in generation 0: its random orientations smear the map over the whole support."""
        from spinifel.geometry.box import support_touches_edge

        if kind in self._warned or self.problem.ctx.rank != 0 or self.generation == 0:
            return
        frac = support_touches_edge(volume, support)
        if frac > EDGE_WARNING:
            self._warned.add(kind)
            log.warning("the %s reaches the edge of its %s (%.2f of its maximum at generation "
                        "%d): the box is too small for the particle; raise algorithm.M (now %d) "
                        "or set it to 0 to choose it from the data", kind,
                        "box" if support is None else "support", frac, self.generation,
                        self.cfg.algorithm.M)

    def orientation_change(self, assignment: Assignment) -> float:
        """Fraction of all images whose grid match changed (collective; NaN if unknown)."""
        prev = self.state.match_index
        if assignment.index is None or prev is None:
            return float("nan")
        n_changed = np.array([float(np.count_nonzero(assignment.index != prev))])
        return float(allreduce_sum(self.comm, n_changed)[0]) / self.problem.n_images

    def assign_orientations(self, model_ac: np.ndarray, images: Any, positions: Any
                            ) -> tuple[np.ndarray, np.ndarray]:
        """Slice ``model_ac``, match ``images`` on the grid, refine off the grid if asked.

        Collective in the distributed matching mode. Adds to the timings ("slicing",
        "matching", "refinement"). Returns the grid indices ``(n,)`` and the orientations
        ``(n, 4)`` on the host.
        """
        import time

        p, a, timings = self.problem, self.cfg.algorithm, self.timings
        t = time.perf_counter()
        slicing_before = timings.get("slicing", 0.0)
        slicer = Slicer(model_ac, positions, p.extent, a.nufft_eps_slicing, p.real,
                        self.cfg.runtime.threads_per_rank)
        match = self._match(images, model_ac, positions, slicer).to(np)  # host bookkeeping
        timings["matching"] = (timings.get("matching", 0.0) + time.perf_counter() - t
                               - (timings.get("slicing", 0.0) - slicing_before))
        quats = p.grid[match.best_index]
        if self.refining(1.0):
            from spinifel.geometry.orientations import grid_spacing

            with StageTimer(timings, "refinement"):
                quats, _ = refine_orientations(
                    images, quats, slicer, 0.5 * grid_spacing(a.n_orientations),
                    a.refine_rounds, a.scale_per_image, transform=a.match_transform,
                    stencil=a.refine_stencil)
        return match.best_index, quats

    def _match(self, images: Any, model_ac: np.ndarray, positions: Any, slicer: Slicer):
        """The grid search of :meth:`assign_orientations` (exhaustive, ring or coarse-to-fine)."""
        p, a, timings = self.problem, self.cfg.algorithm, self.timings
        if a.matching_mode == "distributed":
            return match_distributed(self.comm, images, slicer, p.grid, p.orientation_batch,
                                     a.scale_per_image, p.image_batch, a.match_transform, timings)
        if a.search == "coarse_to_fine":
            from spinifel.orientation.coarse_to_fine import match_with_config

            match, c2f = match_with_config(images, model_ac, positions, p.extent, slicer, a,
                                           p.real, self.cfg.runtime.threads_per_rank, timings)
            log.info("coarse-to-fine search: %d distance evaluations, %.1fx fewer than "
                     "exhaustive", c2f.evaluations, c2f.reduction)
            return match
        if a.search == "polar":
            return self._match_polar(images, model_ac, positions, slicer)
        return match_orientations(images, _timed_batches(slicer, p.grid, p.orientation_batch,
                                                         timings),
                                  a.scale_per_image, p.image_batch, a.match_transform)

    def _match_polar(self, images: Any, model_ac: np.ndarray, positions: Any, slicer: Slicer):
        """``algorithm.search = "polar"`` (collective): every in-plane angle of each beam
        direction by FFT, the directions split over the ranks, each image's best
        ``polar_candidates`` rescored with ``slicer``
        (:func:`~spinifel.orientation.polar.match_polar_distributed`; host arrays).
        Direction batches hold about as many model values as ``orientation_batch``
        ordinary slices."""
        from spinifel.orientation.polar import match_polar_distributed

        p, a = self.problem, self.cfg.algorithm
        pg, polar, dirs, batch = self._polar_setup(model_ac, positions, None)
        return match_polar_distributed(
            self.comm, to_host(images), pg, polar, dirs, batch, a.scale_per_image,
            a.match_transform, min(p.image_batch, 512), p.real, a.polar_candidates,
            (p.grid, slicer), self.timings)

    def merge(self, assignment: Assignment) -> Merged:
        """Normal equations of the local images at ``assignment``'s orientations, summed
        over the ranks, solved by CG with the L-curve's lambda (collective). Under half
        sets, each half's equations separately (the full set's are their sum)."""
        p, a, st, timings = self.problem, self.cfg.algorithm, self.state, self.timings
        cuda_aware = self.cfg.runtime.cuda_aware_mpi
        threads = self.cfg.runtime.threads_per_rank
        quats, post = assignment.orientations, assignment.posterior
        bg = None if assignment.background is None else assignment.background[0]

        def equations(images: Any, q: np.ndarray, rows: np.ndarray | None = None):
            if post is None:
                return accumulate_normal_equations(self.comm, images, q, p.d_positions,
                                                   p.extent, a.M, None, a.nufft_eps_merge,
                                                   threads, p.image_batch, timings, cuda_aware)
            return accumulate_posterior_normal_equations(
                self.comm, images, post if rows is None else posterior_rows(post, rows),
                p.grid if assignment.posterior_grid is None else assignment.posterior_grid,
                p.d_positions, p.extent, a.M, None, a.nufft_eps_merge, threads, p.image_batch,
                timings, cuda_aware, background=bg,
                shared_grid=assignment.posterior_grid is None)

        half_eqs = None
        if p.cv_rows is None:
            eq = equations(p.images, quats)
        else:  # the full set's equations are the sum of the halves' (same NUFFT work)
            half_eqs = [equations(p.images[d_mine], quats[mine], mine)
                        for mine, d_mine in p.cv_rows]
            eq = add_normal_equations(*half_eqs)
        holdout = (tuple(half_eqs) if half_eqs is not None and a.lambda_choice == "holdout"
                   and len(a.lambdas) > 1 else None)  # one lambda: nothing to choose
        x0 = self._zeros if st.full.phased_ac is None else st.full.phased_ac
        x_init = x0 if st.full.merged_ac is None else st.full.merged_ac
        serial = self.serial_threads(1 if holdout is None else 3)
        res = merge(self.comm, eq, lambdas_rel=a.lambdas, x0=x0, x_init=x_init,
                    support=p.support, max_iter=a.cg_max_iter, tol=a.cg_tol, nthreads=serial,
                    timings=timings, cuda_aware_mpi=cuda_aware, holdout=holdout)
        res.autocorrelation = to_host(res.autocorrelation)  # stage boundary: state on the host
        self.warn_edge("merged autocorrelation", res.autocorrelation, p.support)
        eq = None
        half_merged = None
        if p.half_rows is not None:
            with StageTimer(timings, "half_sets"):
                hx0 = [self._zeros if hs.phased_ac is None else hs.phased_ac for hs in st.halves]
                half_merged = solve_each(
                    self.comm, half_eqs, lam_rel=res.lam_rel, x0s=hx0,
                    x_inits=[x if hs.merged_ac is None else hs.merged_ac
                             for x, hs in zip(hx0, st.halves)],
                    support=p.support, max_iter=a.cg_max_iter, tol=a.cg_tol,
                    nthreads=self.serial_threads(2))
            half_eqs = None
        release_memory_pool(p.xp)
        return Merged(result=res, halves=half_merged)

    def phase(self, merged: Merged) -> list[Phased]:
        """Phase the full map on rank 0 and the half maps (if any) on ranks 1 and 2 (modulo
        the rank count), concurrently; broadcast each from its owner (collective).
        Returns the full map's :class:`Phased` first, then the halves'."""
        p, st, g = self.problem, self.state, self.generation
        rank, size = self.problem.ctx.rank, self.problem.ctx.size
        with StageTimer(self.timings, "phasing"):
            jobs = [(merged.result.autocorrelation, st.full, 0)]
            if merged.halves is not None:
                jobs += [(merged.halves[h], st.halves[h], h + 1) for h in (0, 1)]
            with fft_workers(p.xp, self.serial_threads(len(jobs))):
                done = [phase_chain(self.cfg, ac, chain, g, p.fourier_mask, stream, p.xp)
                        if rank == stream % size else None for ac, chain, stream in jobs]
            quiet_wait(self.comm)  # ranks without a map sleep until the owners are done
            phased = [self._share(ph, ac, stream % size)
                      for (ac, _, stream), ph in zip(jobs, done)]
        self.warn_edge("density", phased[0].density)
        return phased

    def serial_threads(self, concurrent_jobs: int) -> int:
        """Threads of a stage one rank computes while the others wait
        (:func:`spinifel.runtime.serial_stage_threads`; ``concurrent_jobs`` such stages may
        run at once, on as many ranks)."""
        from spinifel.runtime import serial_stage_threads

        rt = self.cfg.runtime
        jobs = min(concurrent_jobs, self.problem.ctx.node_size)
        return serial_stage_threads(rt.serial_threads, rt.threads_per_rank, jobs)

    def _share(self, ph: Any, data_ac: np.ndarray, owner: int) -> Phased:
        """Broadcast one phasing result from ``owner``; rescale its autocorrelation."""
        comm = self.comm
        d = bcast_array(comm, None if ph is None else to_module(ph.density, np, np.float64), owner)
        sp = bcast_array(comm, None if ph is None else to_module(ph.support, np, bool), owner)
        pa = bcast_array(comm, None if ph is None else to_module(ph.autocorrelation, np,
                                                                  np.float64), owner)
        # Positivity and the support remove some power: put the phased model back on
        # the data's scale (least squares over the measured shell) so that matching
        # compares like with like; a model that is globally too bright or too dim
        # biases the Euclidean distance towards dim or bright orientations.
        pa *= model_scale(pa, data_ac, self.problem.fourier_mask)
        return Phased(d, sp, pa, None if ph is None else float(ph.fourier_error))

    def advance(self, assignment: Assignment, merged: Merged, phased: list[Phased],
                changed: float) -> StepReport:
        """New state from this generation's stages; the metrics entry for the handlers."""
        p, a, g, old = self.problem, self.cfg.algorithm, self.generation, self.state
        res, full = merged.result, phased[0]
        halves, half_summary = old.halves, None
        if merged.halves is not None:
            halves = [ChainState(generation=g, merged_ac=merged.halves[h],
                                 phased_ac=phased[h + 1].phased_ac, density=phased[h + 1].density,
                                 support=phased[h + 1].support) for h in (0, 1)]
            if p.ctx.rank == 0:
                from spinifel.validation.halves import half_map_fsc

                with StageTimer(self.timings, "half_sets"):
                    half_summary = half_map_fsc(halves[0].density, halves[1].density,
                                                p.voxel_angstrom)
                    half_summary["mode"] = "independent" if assignment.independent else "shared"
        density_change = float("nan")
        if old.full.density is not None:
            den = np.linalg.norm(old.full.density)
            density_change = (float(np.linalg.norm(full.density - old.full.density) / den)
                              if den > 0 else float("nan"))
        converged = (g > 0 and a.orientation_change_tol > 0 and a.density_change_tol > 0
                     and changed < a.orientation_change_tol
                     and density_change < a.density_change_tol)
        self.state = SolverState(
            generation=g, orientations=assignment.orientations,
            match_index=old.match_index if assignment.index is None else assignment.index,
            full=ChainState(generation=g, merged_ac=res.autocorrelation,
                            phased_ac=full.phased_ac, density=full.density,
                            support=full.support),
            halves=halves, converged=converged,
            fluence=(assignment.posterior.fluence if assignment.posterior is not None
                     and a.fluence == "emc" else old.fluence),
            background=assignment.background or old.background)
        entry = {"generation": g, "timings": self.timings,
                 "cg_iterations": res.cg_iterations[res.index], "lambda": res.lam,
                 "lambda_rel": res.lam_rel, "lcurve": {"lambdas_rel": res.lambdas_rel,
                                                      "residual_norms": res.residual_norms,
                                                      "solution_norms": res.solution_norms,
                                                      "misfit_excess": res.misfit_excess,
                                                      "heldout_misfit": res.heldout_misfit,
                                                      "criterion": res.criterion,
                                                      "cg_converged": res.cg_converged},
                 "orientation_change": changed, "density_change": density_change,
                 "fourier_error": full.fourier_error}
        if half_summary is not None:
            entry["half_set"] = half_summary
        if assignment.metrics is not None:
            entry["posterior"] = assignment.metrics
        return self._report(entry, assignment)

    def _report(self, entry: dict, assignment: Assignment) -> StepReport:
        """Gather every image's orientations (file order) on rank 0 (collective)."""
        st = self.state
        all_q = gather_objects(self.comm, st.orientations)
        report = StepReport(generation=st.generation, entry=entry, assignment=assignment,
                            converged=st.converged,
                            last=st.generation == self.cfg.algorithm.generations - 1
                            or st.converged, timings=self.timings)
        if self.problem.ctx.rank == 0:
            report.orientations = np.concatenate(all_q, axis=0)
            report.intensity = intensity_from_autocorrelation(st.full.merged_ac)
        return report


def _timed_batches(slicer: Any, grid: np.ndarray, batch: int, timings: dict):
    """Slice batches for matching, accumulating the slicing time separately (``slicer``: a
    :class:`Slicer` and orientations, or a ``PolarSlicer`` and beam directions)."""
    for start in range(0, len(grid), batch):
        with StageTimer(timings, "slicing"):
            s = slicer.slices(grid[start:start + batch])
        yield start, s
