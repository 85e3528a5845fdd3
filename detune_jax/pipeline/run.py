"""The driver of a recovery: open -> plan -> solve each group -> write and
report, resumable and multi-process (see :mod:`detune_jax.pipeline`)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import jax
import numpy as np
from absl import logging

from detune_jax.io.errors import BadInputError
from detune_jax.io.progress import (PARTS_DIR, RUN_FILE, Progress, read_json,
                                    write_json_atomic)
from detune_jax.pipeline.config import (FORMAT_VERSION, KINDS, PLAN_FILE,
                                        REPORT_FILE, RecoverConfig)
from detune_jax.pipeline.inputs import (Inputs, check_output_dir,
                                        check_writable, open_inputs,
                                        run_fingerprint)
from detune_jax.pipeline.plan import (Group, TensorPlan, assign_groups,
                                      make_groups, plans_from_json,
                                      plans_to_json, scan)
from detune_jax.pipeline.progress_bar import layer_bar
from detune_jax.pipeline.report import build_report, make_plots
from detune_jax.pipeline.solve import solve_group
from detune_jax.pipeline.write import assemble
from detune_jax.solvers import registry
from detune_jax.timings import Timings


def initialize_distributed(coordinator_address: str, num_processes: int,
                           process_id: int):
  """``jax.distributed.initialize`` for multi-process recovery.

  On CPU the cross-process collectives use gloo. Must run before any JAX
  computation. A no-op for ``num_processes <= 1``.
  """
  if num_processes <= 1:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id,
                             shutdown_timeout_seconds=3600)


def recover(config: RecoverConfig, *,
            on_group_done: Optional[Callable[[int], None]] = None,
            progress_bar: bool = True) -> dict:
  """Recovers the pre-fine-tuning model; see :mod:`detune_jax.pipeline`.

  Args:
    config: :class:`RecoverConfig`.
    on_group_done: called with the number of groups this call has solved,
      after each one is checkpointed (tests use it to stop a run).
    progress_bar: show a tqdm bar of layers (with ETA) on stderr.

  Returns:
    The report (also written to ``OUT/report.json`` by process 0; other
    processes return it once process 0 has written it).

  Raises:
    BadInputError: bad input (nothing is written to the output directory
      when raised before the scan ends, which covers every check).
  """
  t_start = time.time()
  timings = Timings()
  if not config.output_dir:
    raise BadInputError("--output_dir", "is required")
  # Absolute from here on: orbax refuses relative checkpoint paths.
  config = dataclasses.replace(config,
                               output_dir=os.path.abspath(config.output_dir))
  out_dir = config.output_dir
  with timings.phase("open"):
    check_writable(out_dir)   # before the (long) scan
    inputs = open_inputs(config)
    fp = run_fingerprint(config, inputs)
    done_report = check_output_dir(out_dir, fp)
  pid = jax.process_index()
  if _all_true(done_report is not None):
    logging.info("%s already holds this finished run", out_dir)
    if config.plots and pid == 0:
      make_plots(done_report, out_dir)
    return done_report
  plans = _plan(config, inputs, fp, timings)
  groups = make_groups(plans, len(inputs.models), config.max_memory_gb,
                       grid=config.dtype_aware
                       and registry.takes_grid_step(config.solver))
  with timings.phase("write"):
    progress = Progress(out_dir, pid)
  done_before = progress.done()
  _solve_groups(groups, done_before, inputs, plans, config, progress,
                timings, on_group_done, progress_bar)
  if pid != 0:
    return _report_of_process_0(out_dir, fp, progress)
  all_groups = {g.index for g in groups}
  while not all_groups <= progress.done():
    time.sleep(0.2)
  with timings.phase("write"):
    progress.ingest_parts()
    files, layers, averaged, solve_seconds = assemble(out_dir, inputs, plans,
                                                     groups, progress)
    progress.close()
  report = build_report(config, inputs, fp, plans, groups, files=files,
                        layers=layers, averaged=averaged,
                        seconds=time.time() - t_start,
                        resumed=len(done_before & all_groups),
                        nproc=jax.process_count())
  report["solve_seconds"] = solve_seconds
  # Seconds by phase of this call (a resumed run counts only its own work);
  # JAX's tracing and compiling, wherever it happened, under "compile".
  report["timings"] = timings.summary()
  write_json_atomic(os.path.join(out_dir, REPORT_FILE), report)
  if jax.process_count() == 1:   # parts/ is for multi-process runs only
    try:
      os.rmdir(os.path.join(out_dir, PARTS_DIR))
    except OSError:
      pass
  if config.plots:
    make_plots(report, out_dir)
  return report


def _plan(config: RecoverConfig, inputs: Inputs, fp: str,
          timings: Timings) -> List[TensorPlan]:
  """Every tensor's plan (this run's ``plan.json`` when an earlier start
  left one, else the scan); then, every check passed, the output directory
  with ``run.json`` and ``plan.json``.

  Raises:
    BadInputError: the scan's, or an output directory that cannot be made.
  """
  out_dir = config.output_dir
  pid = jax.process_index()
  plan_json = read_json(os.path.join(out_dir, PLAN_FILE))
  cached = isinstance(plan_json, dict) and plan_json.get("fingerprint") == fp
  with timings.phase("scan"):
    if _all_true(cached):
      plans = plans_from_json(plan_json["tensors"])
    else:
      plans = scan(inputs, config)
  counts = {k: sum(p.kind == k for p in plans) for k in KINDS}
  logging.info("%d tensors: %d fine-tuned LoRA layers, %d averaged, %d copied",
               len(plans), counts["lora"], counts["mean"],
               counts["copy"] + counts["first"])
  if not counts["lora"] and not counts["mean"] and pid == 0:
    logging.warning("no float tensor differs between the %d models: the "
                    "output is a copy of %s", len(inputs.models),
                    inputs.models[0].path)
  # Every check has passed: from here on the output directory is written.
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise BadInputError(out_dir, f"cannot create the output directory "
                        f"({e.strerror or e})")
  if pid == 0:
    write_json_atomic(os.path.join(out_dir, RUN_FILE),
                      {"fingerprint": fp, "format": FORMAT_VERSION,
                       "config": dataclasses.asdict(config)})
    if not cached:
      write_json_atomic(os.path.join(out_dir, PLAN_FILE),
                        {"fingerprint": fp, "tensors": plans_to_json(plans)})
  return plans


def _solve_groups(groups: Sequence[Group], done_before, inputs: Inputs,
                  plans: Sequence[TensorPlan], config: RecoverConfig,
                  progress: Progress, timings: Timings,
                  on_group_done: Optional[Callable[[int], None]],
                  progress_bar: bool):
  """Solves and checkpoints this process's groups not ``done_before``,
  under a progress bar of layers."""
  pid, nproc = jax.process_index(), jax.process_count()
  owner = assign_groups(groups, nproc)
  mine = [g for g in groups if owner[g.index] == pid]
  todo = [g for g in mine if g.index not in done_before]
  plan_by_name: Dict[str, TensorPlan] = {p.name: p for p in plans}
  logging.info("%d layer groups (%d here, %d already done)", len(groups),
               len(mine), len(mine) - len(todo))
  with layer_bar(total=sum(len(g.names) for g in mine),
                 initial=sum(len(g.names) for g in mine if g not in todo),
                 desc=f"recover[{pid}]" if nproc > 1 else "recover",
                 enabled=progress_bar) as bar:
    for count, g in enumerate(todo, 1):
      tree = solve_group(g, inputs, plan_by_name, config, timings)
      with timings.phase("write"):
        progress.save(g.index, tree)
      logging.info("group %d/%d: %d x %s ranks %s in %.1fs", g.index + 1,
                   len(groups), len(g.names), list(g.matrix_shape),
                   list(g.ranks), float(tree["seconds"]))
      if bar is not None:
        bar.update(len(g.names))
      if on_group_done is not None:
        on_group_done(count)


def _report_of_process_0(out_dir: str, fp: str, progress: Progress) -> dict:
  """Waits for process 0 to assemble the model from everyone's groups;
  returns its report."""
  while True:
    rep = read_json(os.path.join(out_dir, REPORT_FILE))
    if (isinstance(rep, dict) and rep.get("fingerprint") == fp
        and rep.get("complete")):
      progress.close()
      return rep
    time.sleep(0.2)


def _all_true(flag: bool) -> bool:
  """Whether ``flag`` holds on every process."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  got = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
  return bool(np.asarray(got).min())
