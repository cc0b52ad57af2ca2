"""The study engine: trials as Optuna trials in a shared storage, each an ordinary nccompile run.

Fixed trials (explicit runs, grid points) are enqueued once, by name; a worker takes one with
`study.ask()`, which hands each waiting trial to exactly one worker, whatever the storage.
Search trials are drawn by the sampler from the spec's space; a configuration that breaks a
budget is rejected analytically (the trial is pruned, nothing trains). Each trial runs in
`trials/NAME/` of the study directory, so an interrupted trial resumes from its last epoch
when it runs again. A trial that fails is recorded with its error and the study goes on.

Workers write a heartbeat into their running trial (runtime.study.trials). A new worker finds trials left RUNNING by
a worker that is gone (its process ended on this machine, or no heartbeat for 5 minutes), or
stopped by Ctrl-C, marks them failed and enqueues them again: they resume, not restart.
"""
from __future__ import annotations

import math
import socket
import time
from pathlib import Path

import optuna

import compiler
from compiler.errors import BudgetError, NcError
from compiler.space import spaces

from ..run.runner import Options, prepare, recipe_and_data, student_for
from ..rundir import process_alive
from .config import StudyConfig, StudyError, Trial, fixed_trials, search_trial
from .samplers import even_step, pruner_for, sampler_for
from .trials import execute, first_lines, resumed_numbers

STALE_SECONDS = 300
COUNTED_SPACE = 5_000       # spaces up to this size are checked point by point at the start (about 1 ms a point)
FRUITLESS_IN_A_ROW = 1_000  # a search whose last this many draws were over budget or drawn before stops drawing
optuna.logging.set_verbosity(optuna.logging.WARNING)


POSTGRES_DRIVERS = (("psycopg", "psycopg"), ("pg8000", "pg8000"), ("psycopg2", "psycopg2"))  # (module, dialect)
POSTGRES_EXTRA = "pip install -e '.[postgres]'"


def with_driver(url: str) -> str:
    """`postgresql://` (or `postgres://`) names no driver: SQLAlchemy would take psycopg2. Take the
    first installed of psycopg 3 (the `postgres` extra), pg8000 and psycopg2 instead; a URL that
    names its driver (`postgresql+pg8000://`) is kept."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    for module, dialect in POSTGRES_DRIVERS:
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{dialect}://{rest}"
    raise NcError(f"--storage {url}: no PostgreSQL driver is installed\n  hint: {POSTGRES_EXTRA} (psycopg 3)")


def storage_for(url: str | None, out: Path):
    """`--storage URL` (PostgreSQL, MySQL, SQLite), else a journal file in the study directory."""
    if url:
        try:
            return optuna.storages.RDBStorage(with_driver(url))
        except NcError:
            raise
        except Exception as err:  # a bad URL, a server that does not answer, a missing driver
            raise NcError(f"--storage {url}: cannot open it ({type(err).__name__}: {str(err).splitlines()[0]})\n"
                          f"  hint: postgresql://USER:PASS@HOST/DB ({POSTGRES_EXTRA}), sqlite:///study.db (one "
                          "worker) or mysql+pymysql://...") from None
    from optuna.storages.journal import JournalFileBackend

    out.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(out / "study.journal")))


def _places(wheres: list[str]) -> str:
    """Where one problem stands: a grid of 100 points with one bad setting is one line, not 100."""
    return ", ".join(wheres) if len(wheres) <= 3 else f"{', '.join(wheres[:2])} and {len(wheres) - 2} more runs"


class Study:
    def __init__(self, cfg: StudyConfig, path: Path, out: Path, *, data: str | None, epochs: int | None,
                 sets: tuple, device: str, storage: str | None, trials: int | None, track: tuple = ()):
        self.cfg, self.path, self.out = cfg, path, out
        self.track = tuple(track)  # every trial's trackers (runtime.tracking)
        self.track_parent: str | None = None  # the study's MLflow run, its trials' parent
        self.data = data or (str((path.parent / cfg.data).resolve()) if cfg.data else None)
        self.epochs, self.sets, self.device = epochs, tuple(sets), device
        self.storage_url = storage
        problems: list[str] = []
        self.fixed = fixed_trials(cfg, path.parent, problems)
        self.template = search_trial(cfg, path.parent, problems)
        self.trials_wanted = trials if trials is not None else (cfg.search.trials if cfg.search else 0)
        if problems:
            raise StudyError(str(path), problems)
        self.rejected_fixed: dict[str, str] = {}
        self.rejected_sizes: dict[str, tuple[int, int]] = {}  # (params, MACs) of a rejected run, as a search's
        self.byte_limits: set[int] = set()
        self.space: dict = {}
        self.points = 0  # configurations in the search space
        self.search_input: tuple | None = None  # what a search's configurations are analysed at, as their runs
        self.search_fixed: dict[str, str] = {}  # build them: the training input, the data's class count
        self.counted = None  # compiler.search's result over the whole space (None: too many to count)
        self.prepared: dict[str, tuple] = {}  # runner.prepare's result for each fixed run that will train
        self._fruitless_in_a_row = 0
        # steps whose epochs a search reports to its pruner: those training the objective step's model (a
        # teacher's epochs say nothing of the configuration drawn, and would stop trials on its noise)
        self.watched_steps: frozenset[str] = frozenset()
        self.validate()

    # --- before any trial runs ---------------------------------------------------------

    def options(self, trial: Trial, on_epoch=None) -> Options:
        trials = self.out / "trials"
        if not (trials / trial.name).resolve().is_relative_to(trials.resolve()):  # names are checked; this too
            raise StudyError(str(self.path), [f"{trial.where}: the run folder {trials / trial.name} lies outside "
                                              f"{trials}"])
        return Options(str(trial.spec), trial.recipe, data=self.data, out=str(trials / trial.name),
                       sets=trial.set_strings(self.sets), epochs=self.epochs, device=self.device,
                       params=trial.param_strings(),
                       on_epoch=on_epoch, step_cache=self.out / "shared" if self.cfg.share_steps else None,
                       track=self.track, track_parent=self.track_parent)

    def validate(self) -> None:
        """Every trial's spec, recipe and overrides, as the runner checks them; all problems at once."""
        problems, by_message = [], {}
        for t in self.fixed:
            try:
                self.prepared[t.name] = prepare(self.options(t))
                self._note_budgets(self.prepared[t.name][3]["student"].model)
            except BudgetError as err:  # a run that breaks its budget is a result, not bad input
                self.rejected_fixed[t.name] = "; ".join(err.failures) or str(err).splitlines()[-1]
                opts = self.options(t)
                recipe, _, _, listing = recipe_and_data(opts)
                a = compiler.analyse(student_for(opts, recipe, listing.classes))
                self.rejected_sizes[t.name] = (a.params, a.macs)
            except NcError as err:
                by_message.setdefault(first_lines(err), []).append(t.where)
        problems += [f"{_places(wheres)}: {message}" for message, wheres in by_message.items()]
        if self.template is not None:
            t = self.template
            try:
                # as its runs build it: the data's class count and the training input (a MACs budget depends on it)
                opts = self.options(t)
                recipe, _, _, listing = recipe_and_data(opts)
                model = student_for(opts, recipe, listing.classes)
                self.search_input = model.input_shape
                if any(p.name == "classes" for p in model.definition.params):
                    self.search_fixed = {"classes": str(len(listing.classes))}
                found = spaces(model.definition, model.params, fixed=t.params)
                if not found:
                    problems.append(f"search.spec: {t.spec} declares no search space "
                                    "(e.g. `base: int = 16 in 8..64 step 8`)")
                self.space = {s.name: [s[i] for i in range(len(s))] for s in found}
                self.points = math.prod(len(v) for v in self.space.values())
                if self.cfg.search.sampler == "grid" and self.trials_wanted > self.points:
                    print(f"search: the grid has {self.points:,} point(s): {self.points:,} trial(s), "
                          f"not {self.trials_wanted:,}")
                    self.trials_wanted = self.points
                self._note_budgets(model)
                if any(len(v) > 100_000 for v in self.space.values()):
                    problems.append("search.spec: a parameter space of more than 100,000 values")
                self._count_feasible(problems)
                prepare(opts)
            except BudgetError:
                pass  # the defaults may break a budget; drawn configurations are checked one by one
            except NcError as err:
                problems.append(f"search: {first_lines(err)}")
            steps = self._recipe_steps(t) if not problems else []
            objective = next((s for s in steps if s.name == self.cfg.search.objective.step), None)
            if steps and objective is None:
                problems.append(f"search.objective.step: no step `{self.cfg.search.objective.step}` in "
                                f"{t.recipe} (steps: {', '.join(s.name for s in steps)})")
            elif objective is not None:  # the pruner watches the epochs that train the measured model
                self.watched_steps = frozenset(s.name for s in steps if s.model == objective.model)
        if problems:
            raise StudyError(str(self.path), problems)

    def _count_feasible(self, problems: list[str]) -> None:
        """How many of a small space's configurations meet the budgets: none is an error (every draw
        would be rejected, for ever), fewer than `trials` caps them."""
        if self.points > COUNTED_SPACE or not self.space:
            return
        from compiler.search import search

        t = self.template
        self.counted = search(t.spec, fixed={**self.search_fixed, **t.param_strings()}, input_shape=self.search_input)
        feasible = len(self.counted.candidates)
        if feasible == 0:
            shape = "x".join(map(str, self.search_input)) if self.search_input else "its declared input"
            problems.append(f"search.spec: none of the {self.points:,} configuration(s) of {t.spec} meets its "
                            f"budgets at the training input {shape}\n  hint: `nccompile search SPEC --all` lists "
                            "configurations against the budgets; loosen a budget or widen the space")
        elif feasible < self.trials_wanted:
            print(f"search: {feasible:,} configuration(s) meet the budgets: {feasible:,} trial(s), "
                  f"not {self.trials_wanted:,}")
            self.trials_wanted = feasible

    def _note_budgets(self, model) -> None:
        """Byte limits of the specs' budgets: the study's plots draw them."""
        from compiler.expr import evaluate

        self.byte_limits.update(evaluate(b.limit, model.params) for b in model.definition.budgets
                                if b.metric == "bytes")

    def _recipe_steps(self, t: Trial) -> list:
        from ..run.plan import load

        _, steps, _ = load(t.recipe, t.set_strings(self.sets), self.epochs)
        return steps

    # --- the Optuna study ------------------------------------------------------------

    def open(self) -> optuna.Study:
        obj = self.cfg.search.objective if self.cfg.search else None
        self.storage = storage_for(self.storage_url, self.out)
        study = optuna.create_study(storage=self.storage, study_name=self.cfg.name,
                                    direction=obj.direction if obj else "maximize",
                                    sampler=sampler_for(self.cfg, self.space, self.trials_wanted,
                                                        shared_storage=self.storage_url is not None),
                                    pruner=pruner_for(self.cfg), load_if_exists=True)
        self._check_settings(study)
        known = {t.user_attrs.get("run") for t in study.get_trials(deepcopy=False)}
        for t in self.fixed:
            if t.name not in known:
                study.enqueue_trial({"run": t.name}, user_attrs={"run": t.name}, skip_if_exists=True)
        self.recover(study)
        return study

    def settings(self) -> dict:
        """What every trial's results depend on besides the study file: a study continues only under these.
        The data folder counts only with the study's own journal: machines sharing a database may keep
        the same images under different paths."""
        data = self.data if self.storage_url is None else None
        return {"data": data, "epochs": self.epochs, "set": list(self.sets)}

    def _check_settings(self, study: optuna.Study) -> None:
        """A finished trial is never run again, so a study started with other --epochs, --set or --data
        would mix results of two settings silently; it is refused instead."""
        before, now = study.user_attrs.get("settings"), self.settings()
        if before is None:
            study.set_user_attr("settings", now)
            return
        if before != now:
            def show(s):
                return " ".join([f"--data {s['data']}" if s["data"] else "(the study's data)",
                                 f"--epochs {s['epochs']}" if s["epochs"] is not None else "(the recipes' epochs)",
                                 *(f"--set {x}" for x in s["set"])])

            raise StudyError(str(self.path), [
                f"{self.out} holds trials run with {show(before)}, but this run asks for {show(now)}\n"
                "  hint: give another --out to run the study under these settings, or repeat the "
                "earlier settings to resume it"])

    def recover(self, study: optuna.Study) -> None:
        """Trials whose worker is gone or was interrupted: failed, and enqueued again to resume."""
        host = socket.gethostname()
        now = time.time()
        trials = study.get_trials(deepcopy=False)
        resumed = resumed_numbers(trials)
        for t in trials:
            a = t.user_attrs
            if t.state == optuna.trial.TrialState.RUNNING:
                w_host, _, pid = str(a.get("worker", "")).rpartition(":")
                gone_here = w_host == host and pid.isdigit() and not process_alive(int(pid))
                if not (gone_here or now - float(a.get("heartbeat", now)) > STALE_SECONDS):
                    continue
                # another worker's trial: only the storage can change it (Optuna has no public handle)
                self.storage.set_trial_user_attr(t._trial_id, "status", "interrupted")
                self.storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            elif not (t.state == optuna.trial.TrialState.FAIL and a.get("status") == "interrupted"):
                continue
            if t.number in resumed:
                continue
            if "run" in a:
                study.enqueue_trial({"run": a["run"]}, user_attrs={"run": a["run"], "resumes": t.number})
            elif t.params:
                study.enqueue_trial(dict(t.params), user_attrs={"resumes": t.number})

    # --- a worker ----------------------------------------------------------------------

    def work(self, on_progress=None) -> None:
        study = self.open()
        names = [t.name for t in self.fixed]
        by_name = {t.name: t for t in self.fixed}
        while True:
            waiting = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))]
            if not waiting and (self.searched(study) >= self.trials_wanted or self._space_drawn(study)):
                break
            if not waiting and self._fruitless_in_a_row >= FRUITLESS_IN_A_ROW:
                print(f"search: the last {FRUITLESS_IN_A_ROW:,} configurations drawn all broke a budget or were "
                      "drawn before; the search stops drawing (loosen a budget, or narrow the space to the ones "
                      "that fit)")
                break
            trial = study.ask()
            if "run" in trial.user_attrs:
                name = trial.suggest_categorical("run", names) if names else None
                if name is None or name not in by_name:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    continue
                self._run_fixed(study, trial, by_name[name])
            elif (self.template is None or self.searched(study, exclude=trial.number) >= self.trials_wanted
                  or self._space_drawn(study, exclude=trial.number)):
                trial.set_user_attr("status", "unused")  # another worker took the last one
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            else:
                self._run_search(study, trial)
                if self._fruitless_in_a_row:  # rejected or drawn before: nothing new to report (or to plot)
                    continue
            if on_progress is not None:
                on_progress(study)

    def searched(self, study, exclude: int | None = None) -> int:
        """Search trials that count against `trials`: configurations trained or training (not rejected ones,
        nor ones drawn again)."""
        return sum(1 for t in study.get_trials(deepcopy=False)
                   if t.number != exclude and "run" not in t.user_attrs
                   and t.user_attrs.get("status") in ("running", "done", "failed", "pruned"))

    def _space_drawn(self, study, exclude: int | None = None) -> bool:
        """The search has drawn every point (rejected ones too): more draws would only repeat them."""
        if self.cfg.search is None:
            return False
        drawn = {tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False)
                 if t.number != exclude and "run" not in t.user_attrs and t.params
                 and t.user_attrs.get("status") != "unused"}
        return len(drawn) >= self.points

    def _run_fixed(self, study, trial, t: Trial) -> None:
        trial.set_user_attr("run", t.name)
        trial.set_user_attr("kind", "fixed")
        trial.set_user_attr("spec", str(t.spec))
        trial.set_user_attr("recipe", t.recipe)
        trial.set_user_attr("model_params", t.params)
        trial.set_user_attr("overrides", {k: v for k, v in t.sets.items()})
        if t.name in self.rejected_fixed:
            trial.set_user_attr("status", "rejected")
            trial.set_user_attr("error", self.rejected_fixed[t.name])
            trial.set_user_attr("params_count", self.rejected_sizes[t.name][0])  # known before training
            trial.set_user_attr("macs", self.rejected_sizes[t.name][1])
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return
        if any(o.user_attrs.get("run") == t.name and o.state == optuna.trial.TrialState.COMPLETE
               for o in study.get_trials(deepcopy=False)):
            trial.set_user_attr("status", "duplicate")  # enqueued twice by racing workers: never run twice
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        self._execute(study, trial, t, objective_step=None)

    def _run_search(self, study, trial) -> None:
        t = self.template
        params = {}
        for name, values in self.space.items():
            step = even_step(values)
            if step is None or self.cfg.search.sampler == "grid":  # a list of choices: only those
                params[name] = trial.suggest_categorical(name, values)
            elif all(isinstance(v, int) for v in values):
                params[name] = trial.suggest_int(name, values[0], values[-1], step=step)
            else:
                params[name] = trial.suggest_float(name, values[0], values[-1], step=step)
        label = "-".join(f"{k}{v}" for k, v in params.items())
        run = Trial(f"{t.name}-{label}", f"search trial {trial.number}", t.spec, t.recipe,
                    {**t.params, **params}, dict(t.sets))
        trial.set_user_attr("kind", "search")
        trial.set_user_attr("name", run.name)
        trial.set_user_attr("spec", str(t.spec))
        trial.set_user_attr("recipe", t.recipe)
        trial.set_user_attr("model_params", run.params)
        trial.set_user_attr("overrides", dict(t.sets))
        model = compiler.compile_spec(t.spec, param_strings={**self.search_fixed, **run.param_strings()},
                                      input_shape=self.search_input)
        analysis = compiler.analyse(model)
        trial.set_user_attr("params_count", analysis.params)  # known before training; the run reports them too
        trial.set_user_attr("macs", analysis.macs)
        if not analysis.ok:
            failed = [b.name + f" fails: {b.shown()}" for b in analysis.budgets if not b.ok]
            trial.set_user_attr("status", "rejected")
            trial.set_user_attr("error", "; ".join(failed))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            self._fruitless_in_a_row += 1
            return
        for o in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if o.user_attrs.get("name") == run.name:  # the sampler drew a configuration again
                for k, v in o.user_attrs.items():
                    if k not in ("worker", "heartbeat"):
                        trial.set_user_attr(k, v)
                trial.set_user_attr("status", "repeat")
                study.tell(trial, o.value)
                self._fruitless_in_a_row += 1
                return
        self._fruitless_in_a_row = 0
        self._execute(study, trial, run, objective_step=self.cfg.search.objective.step, drawn=True,
                      watched=self.watched_steps)

    def _execute(self, study, trial, t: Trial, objective_step: str | None, drawn: bool = False,
                 watched: frozenset[str] = frozenset()) -> None:
        execute(study, trial, self.storage, lambda hook: self.options(t, hook),
                self.out / "trials" / t.name, t.name, objective_step, drawn, watched)
