"""Every Ray resource request of a run, checked against the cluster before anything waits.

Ray never fails a request the cluster cannot meet: a Ray Train worker group or a Ray Data
actor pool that asks for more CPUs or GPUs than any node has stays pending (with, at most, a
warning in a log), and the run hangs. Ray does this on purpose, because an autoscaling
cluster may add the node later. raydefense knows every request a run will make from its
config, so it checks them all up front (one line naming the config key and what the cluster
has), or, with ``scale.resource_wait_s > 0`` (an autoscaling cluster), prints one
``waiting for resources: ...`` line and polls until they appear or the time is up.

A run makes these requests, one stage at a time (stages never overlap):

* each Ray Train fit (target, surrogate, GNR, UDDN and baseline denoisers, teacher, student,
  DCN, distillation; and each Tune trial, which adds only a 0.01-CPU trial driver): a
  placement group of ``scale.num_workers`` bundles (the minimum of an elastic
  ``(num_workers, max_workers)`` group) of ``{CPU: scale.cpus_per_worker}`` plus
  ``{GPU: scale.gpus_per_worker}`` when training on GPU and ``scale.worker_resources``
  (see ``training.make_trainer``);
* each Ray Data pool of actors or tasks (prepare, attack, GNR augmentation, KT denoising, evaluation,
  whole-model attacks, see ``runtime.pool_map``): ``scale.attack_actors`` actors of
  ``{CPU: scale.cpus_per_actor}``; on GPU one actor per GPU, at most ``scale.attack_actors``
  (``runtime.pool_actors``), each with one GPU and one CPU (Ray Data's default beside a GPU), so
  the check asks for one such actor.

A Tune trial (``jobs/tune_defense.py``) also holds a small driver actor
(``TRIAL_DRIVER_CPU``) while its workers or its actor pool run, so with ``tune=True`` each
group must fit together with it.

A bundle must fit on one node, so the check counts, node by node, how many bundles each node
holds (``floor(min over resources of node / bundle)``); the sum must reach the count. This is
exact for identical bundles. Resources other requests already hold are not subtracted: the
check is about what can ever fit, not what is free now.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from raydefense.config import Config
from raydefense.errors import ConfigError

__all__ = ["Request", "requests_for", "shortfall", "check_resources", "find_shortfalls", "wait_for_resources",
           "ensure_resources", "cluster_nodes"]

Node = Mapping[str, float]

# The CPU a Tune trial's driver actor holds (raydefense.tune.search.TRIAL_DRIVER_CPU; not
# imported from there, which would import Ray Tune into every run).
TRIAL_DRIVER_CPU = 0.01

# The CPU a GPU actor of runtime.pool_map holds: Ray Data's own default beside num_gpus=1
# (pool_map passes only num_gpus on GPU; Ray Data warns when both are given).
GPU_ACTOR_CPU = 1.0


@dataclass(frozen=True)
class Request:
    """``count`` identical bundles that must all be placed at once.

    Attributes:
        what: what asks, in words ("training worker").
        bundle: resource name -> amount per bundle, e.g. ``{"CPU": 2.0, "GPU": 1.0}``.
        count: bundles needed at once.
        count_key: the config key that sets ``count``.
        keys: resource name -> the config key that sets that amount.
    """

    what: str
    bundle: Mapping[str, float]
    count: int
    count_key: str
    keys: Mapping[str, str]


def requests_for(cfg: Config, *, gpu: bool) -> list[Request]:
    """The resource requests a run of ``cfg`` makes (``gpu``: training and actors on GPU)."""
    s = cfg.scale
    worker: dict[str, float] = {"CPU": float(s.cpus_per_worker)}
    worker_keys = {"CPU": "scale.cpus_per_worker"}
    actor: dict[str, float] = {"CPU": float(s.cpus_per_actor)}
    actor_keys = {"CPU": "scale.cpus_per_actor"}
    for name, amount in s.worker_resources.items():  # custom resources, e.g. a node type's label
        worker[name] = float(amount)
        worker_keys[name] = f"scale.worker_resources.{name}"
    if gpu:
        worker["GPU"] = float(s.gpus_per_worker)
        worker_keys["GPU"] = "scale.gpus_per_worker"
        actor = {"CPU": GPU_ACTOR_CPU, "GPU": 1.0}  # runtime.pool_map: one GPU per actor
        actor_keys = {"CPU": "scale.use_gpu", "GPU": "scale.use_gpu"}
    # Elastic training starts with the minimum (scale.num_workers) and grows when it can.
    return [
        Request("training worker", worker, s.num_workers, "scale.num_workers", worker_keys),
        # On GPU the pool shrinks to the GPUs there are (runtime.pool_actors): one actor must fit.
        Request("Ray Data actor", actor, 1 if gpu else s.attack_actors, "scale.attack_actors", actor_keys),
    ]


def _fits(node: Node, bundle: Mapping[str, float]) -> int:
    """How many ``bundle`` s one node holds."""
    n = math.inf
    for res, amount in bundle.items():
        if amount > 0:
            # 1e-9: Ray stores fractional resources in units of 1e-4; 0.1 * 3 must fit in 0.3.
            n = min(n, math.floor(node.get(res, 0.0) / amount + 1e-9))
    return 0 if n == math.inf else int(n)


def _place_with_driver(req: Request, nodes: Sequence[Node], driver: Mapping[str, float]) -> bool:
    """Whether ``req``'s bundles and one ``driver`` bundle fit at once: bundles first-fit, node by
    node (identical bundles, so the leftovers are as concentrated as they can be), then the driver
    on any node's leftover."""
    left = [dict(n) for n in nodes]
    todo = req.count
    for node in left:
        k = min(todo, _fits(node, req.bundle))
        for res, amount in req.bundle.items():
            node[res] = node.get(res, 0.0) - k * amount
        todo -= k
    return todo == 0 and any(_fits(node, driver) for node in left)


def _describe_cluster(nodes: Sequence[Node]) -> str:
    cpu = sum(n.get("CPU", 0.0) for n in nodes)
    gpu = sum(n.get("GPU", 0.0) for n in nodes)
    text = f"{cpu:g} CPU, {gpu:g} GPU"
    if len(nodes) > 1:
        big = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)))
        text += f" on {len(nodes)} nodes, the largest {big.get('CPU', 0.0):g} CPU, {big.get('GPU', 0.0):g} GPU"
    return text


def _amount(res: str, value: float) -> str:
    return f"{value:g} {res}"


def shortfall(req: Request, nodes: Sequence[Node]) -> Optional[str]:
    """Why ``req`` can never be placed on ``nodes`` (one line naming the config key), or None."""
    cluster = _describe_cluster(nodes)
    if not any(_fits(n, req.bundle) for n in nodes):
        # Name the resource no node has enough of (the first such, CPU before GPU).
        for res in sorted(req.bundle, key=lambda r: (r != "CPU", r)):
            amount = req.bundle[res]
            if amount > 0 and all(n.get(res, 0.0) + 1e-9 < amount for n in nodes):
                key = req.keys.get(res, "scale")
                return (f"config key '{key}': each {req.what} asks for {_amount(res, amount)}, "
                        f"but no node of the cluster has that much (cluster: {cluster})")
        wants = ", ".join(_amount(r, a) for r, a in req.bundle.items())
        return (f"config key '{req.keys.get('CPU', 'scale')}': each {req.what} asks for {wants}, "
                f"but no node of the cluster has all of it (cluster: {cluster})")
    placed = sum(_fits(n, req.bundle) for n in nodes)
    if placed < req.count:
        wants = ", ".join(_amount(r, a) for r, a in req.bundle.items())
        return (f"config key '{req.count_key}': {req.count} {req.what}s of {wants} each do not fit; "
                f"the cluster holds {placed} (cluster: {cluster})")
    return None


def check_resources(cfg: Config, nodes: Sequence[Node] | Node, *, gpu: bool, tune: bool = False) -> None:
    """Raise ConfigError (one line: the config key and what the cluster has) when a request of
    the run can never be placed.

    Args:
        cfg: the run's config.
        nodes: each alive node's total resources, or the cluster's totals
            (``ray.cluster_resources()``, treated as one node).
        gpu: whether training and actors run on GPU.
        tune: also check that each group fits beside a Tune trial's driver.
    """
    problems = find_shortfalls(cfg, nodes, gpu=gpu, tune=tune)
    if problems:
        raise ConfigError(problems[0])


def find_shortfalls(cfg: Config, nodes: Sequence[Node] | Node, *, gpu: bool, tune: bool = False) -> list[str]:
    """One line per request of ``cfg`` that can never be placed on ``nodes`` (empty: all fit)."""
    node_list = [nodes] if isinstance(nodes, Mapping) else list(nodes)
    problems = []
    for req in requests_for(cfg, gpu=gpu):
        problem = shortfall(req, node_list)
        if problem is None and tune and not _place_with_driver(req, node_list, {"CPU": TRIAL_DRIVER_CPU}):
            wants = ", ".join(_amount(r, a) for r, a in req.bundle.items())
            problem = (f"config key '{req.keys.get('CPU', req.count_key)}': a Tune trial holds a "
                       f"{TRIAL_DRIVER_CPU:g}-CPU driver beside its {req.count} {req.what}(s) of {wants}, and the "
                       f"cluster holds the {req.what}s but not the driver (cluster: {_describe_cluster(node_list)})")
        if problem:
            problems.append(problem)
    return problems


def wait_for_resources(cfg: Config, get_nodes: Callable[[], Sequence[Node]], *, gpu: bool, tune: bool = False,
                       echo: Callable[[str], None] = print, poll_s: float = 5.0,
                       clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Like :func:`check_resources`, but on a shortfall wait up to ``scale.resource_wait_s``
    seconds (an autoscaling cluster adds nodes), polling ``get_nodes`` every ``poll_s``.

    Prints one ``waiting for resources: ...`` line when it starts waiting; raises the
    shortfall's ConfigError (with how long it waited) when the time is up.
    """
    problems = find_shortfalls(cfg, get_nodes(), gpu=gpu, tune=tune)
    if not problems:
        return
    limit = cfg.scale.resource_wait_s
    if limit <= 0:
        raise ConfigError(problems[0])
    echo(f"waiting for resources: {problems[0]} (up to {limit:g} s, scale.resource_wait_s)")
    deadline = clock() + limit
    while clock() < deadline:
        sleep(max(0.0, min(poll_s, deadline - clock())))
        problems = find_shortfalls(cfg, get_nodes(), gpu=gpu, tune=tune)
        if not problems:
            echo("resources available; going on")
            return
    raise ConfigError(f"{problems[0]}; waited {limit:g} s (scale.resource_wait_s) for the cluster to grow")


def cluster_nodes() -> list[dict[str, float]]:
    """Each alive node's total resources (``ray.nodes()``), or the cluster's totals."""
    import ray

    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    return nodes or [dict(ray.cluster_resources())]


def ensure_resources(cfg: Config, *, gpu: bool, tune: bool = False, echo: Callable[[str], None] = print) -> None:
    """:func:`wait_for_resources` against the connected Ray cluster (call after ``init_ray``)."""
    wait_for_resources(cfg, cluster_nodes, gpu=gpu, tune=tune, echo=echo)
