"""The search on the tiny model: its config, a search in a thread that must end in time, and
the configurations a study or a search result holds."""

import threading

import optuna

from loralens.study.config import load_config
from loralens.training.search import run_search
from tests.helpers.overrides import TINY_MODEL


# tiny_base (conftest): the registry's tiny-random model, a stand-in for SmolLM2.
def search_cfg(glue_dir, trials=4, extra=()):
    return load_config(overrides=[
        TINY_MODEL, f"data.glue_dir={glue_dir}", f"search.trials={trials}",
        "search.startup_trials=2",
        "search.train_size=16", "search.eval_size=16", "search.epochs=[1]",
        "data.max_length=32", "search.prune=false", *extra])


def search_within(cfg, run, base, why: str, timeout: float = 120) -> tuple[list, list]:
    """run_search of rte/lora in a thread that must end within ``timeout`` seconds:
    ([its result], the study's trials)."""
    done: list = []
    t = threading.Thread(target=lambda: done.append(
        run_search(cfg, run, "rte", "lora", base, progress=False)), daemon=True)
    t.start()
    t.join(timeout=timeout)
    assert not t.is_alive(), why
    return done, optuna.load_study(study_name="loralens-rte-lora",
                                   storage=run.sqlite_url("search")).get_trials()


def configs(res_or_study) -> list[tuple]:
    trials = (res_or_study["trials"] if isinstance(res_or_study, dict)
              else [{"params": t.params} for t in res_or_study.trials])
    return [tuple(sorted(t["params"].items())) for t in trials]
