"""What a suite needs from its data, checked before the model loads; results kept when a task fails.

``preflight`` runs in ``uwm eval`` after the suite file is read and before the model is loaded.
It checks everything that does not need the model and reports every problem at once (a
ConfigError naming the suite file, the task and the data):

  * the held-out data has episodes;
  * ``rollout``, ``action_sensitivity``, ``controllability`` (logged actions) and ``fvd`` have
    evaluated episodes long enough for their context and horizon (from each episode's
    ``frame_shape``, without decoding a frame);
  * ``caption`` has an evaluated episode with a caption at t=0;
  * ``controllability`` and ``caption`` have episodes to learn from (``train_data``, or held-out
    episodes beyond ``n_episodes``) that share no seed with the evaluated ones; they are loaded
    here once and handed to the tasks;
  * ``offscreen`` and ``revisit`` have held-out probe episodes of their kind;
  * ``action_sensitivity``'s two actions are actions of the model (its processor_config.json).

``TaskFailures`` is what ``run_suite`` raises after the last task when some task failed late:
``results.json`` / ``results.md`` still hold every task that finished, and name the failed
ones under ``failed_tasks``.
"""
from __future__ import annotations

from pathlib import Path

from unified_wm.utils import ConfigError


class TaskFailures(RuntimeError):
    """One or more tasks of a suite failed while running; the others' results were written."""

    def __init__(self, failed: dict[str, str], out_dir):
        self.failed = failed
        where = f"; the results of the tasks that finished are in '{Path(out_dir) / 'results.json'}'" if out_dir else ""
        super().__init__("; ".join(f"task '{t}' failed: {m}" for t, m in failed.items()) + where)


def _frame_counts(ds, n: int) -> list[int]:
    shapes = ds.select(range(n))["frame_shape"] if "frame_shape" in ds.column_names else None
    if shapes is not None:
        return [int(s[0]) if s else 0 for s in shapes]
    return [len(a) + 1 for a in ds.select(range(n))["actions"]]


def preflight(suite, ds, suite_path: str, model_dir) -> tuple | None:
    """Check the suite's data before the model loads (see the module doc). Returns the reference
    episodes of ``controllability``/``caption`` (``(episodes, source)``) when a task needs them."""
    from unified_wm.eval.memory import _probe_episodes
    from unified_wm.eval.runner import reference_episodes

    problems: list[str] = []
    n = min(suite.n_episodes, len(ds))
    if n == 0:
        raise ConfigError(f"{suite_path}: data '{suite.data}' holds no episodes")
    frames = _frame_counts(ds, n)
    longest = max(frames)
    rs = suite.rollout
    c, H = rs.context_frames, rs.horizon
    need = {}
    if "rollout" in suite.tasks:
        need["rollout"] = (c + H, f"{c} context frames + a {H}-frame rollout")
    if "action_sensitivity" in suite.tasks:
        need["action_sensitivity"] = (c, f"{c} context frames")
    if "controllability" in suite.tasks and suite.controllability.actions == "logged":
        need["controllability"] = (c + H, f"{c} context frames + a {H}-step rollout under logged actions")
    for task, (k, why) in need.items():
        if longest < k:
            problems.append(f"task '{task}' needs an episode of at least {k} frames ({why}); the {n} evaluated episodes "
                            f"of '{suite.data}' have at most {longest}")
    if "fvd" in suite.tasks:
        F = suite.fvd.frames
        long_enough = sum(f >= F for f in frames)
        if long_enough < 2:
            problems.append(f"task 'fvd' needs at least 2 evaluated episodes of {F} frames (fvd.frames); "
                            f"'{suite.data}' has {long_enough} among its first {n}")
    if "caption" in suite.tasks:
        caps = ds.select(range(n))["captions"]
        if not any(any(int(t) == 0 for t in (cp["t"] if isinstance(cp, dict) else [x["t"] for x in cp])) for cp in caps):
            problems.append(f"task 'caption' needs evaluated episodes with a caption at t=0; none of the first {n} "
                            f"episodes of '{suite.data}' has one")
    for task, key in (("offscreen", "offscreen_data"), ("revisit", "revisit_data")):
        if task in suite.tasks:
            try:
                _probe_episodes(getattr(suite, key), task, suite.n_probes, None, Path(model_dir), suite_path)
            except ConfigError:
                raise  # seeds shared with the training data: its own message
            except (ValueError, FileNotFoundError) as e:
                problems.append(f"task '{task}' ({key}): {e}")
    if "action_sensitivity" in suite.tasks:
        import json

        cfg = Path(model_dir) / "processor_config.json"
        names = json.loads(cfg.read_text()).get("action_names") if cfg.is_file() else None
        unknown = [a for a in suite.sensitivity_actions if names is not None and a not in names]
        if len(suite.sensitivity_actions) != 2:
            problems.append(f"sensitivity_actions: expected two actions, got {suite.sensitivity_actions}")
        elif unknown:
            problems.append(f"sensitivity_actions: '{unknown[0]}' is not an action of the model ({cfg}: "
                            f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''})")
    reference = None
    if "controllability" in suite.tasks or "caption" in suite.tasks:
        try:
            reference = reference_episodes(suite, ds, suite_path)
        except ConfigError as e:
            problems.append(str(e).removeprefix(f"{suite_path}: "))
        except FileNotFoundError as e:
            problems.append(f"train_data: {e}")
    if problems:
        raise ConfigError(f"{suite_path}: the suite cannot run (checked before loading the model): " + "; ".join(problems))
    return reference
