"""Where a replica's GPUs sit, and the links its collectives and pipeline transfers cross.

A **node spec** (YAML in ``cost_models/specs/nodes/``, or any YAML path; ``load_node``) describes one server:

=====================  ==================================================================================
key                    meaning
=====================  ==================================================================================
``name``               the spec's name (``--node NAME``)
``device``             the GPU of every slot (a device spec name, ``cost_models/specs/devices``)
``gpus_per_node``      GPUs in one node
``nvlink_group``       GPUs that share a fast intra-node link domain: 2 for pairwise NVLink bridges (A100
                       PCIe, A40), ``gpus_per_node`` for an NVSwitch (DGX/HGX); 1 for none
``links``              ``nvlink`` (inside an NVLink group), ``pcie`` (between groups of one node) and
                       ``network`` (between nodes; optional): each ``{bandwidth_bytes_per_s, latency_s}``,
                       bandwidth per direction as achieved by NCCL (bus bandwidth), latency per message step
``num_nodes``          optional: nodes in the cluster (a cluster larger than this is an error)
=====================  ==================================================================================

**Placement** (``place``): a replica with tensor parallelism ``tp`` and pipeline parallelism ``pp`` takes ``tp x
pp`` consecutive GPU slots, stage by stage; a TP group stays inside one node whenever it fits (it starts on the
next node when the current one has too few slots left), so TP runs over NVLink/PCIe and PP is what crosses nodes.
A TP group larger than a node spans nodes and its all-reduce pays the network link (an error if the spec has
none). Replicas of a cluster are placed one after another.

The link of a group is the slowest link its ring crosses (NCCL rings run at the bandwidth of their slowest hop):
``nvlink`` inside one NVLink group, ``pcie`` inside one node, ``network`` across nodes.

Without a node spec, a node is derived from the device (``default_node``): 8 GPUs fully connected by the device's
``interconnect_bandwidth_bytes_per_s``/``interconnect_latency_s`` and no network, the single-server setup every
earlier servesim run assumed.

Errors: ``SpecError`` naming the file and key, or the flag (``--tp``/``--pp``/``--node``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cost_models.specs import SPEC_DIR, DeviceSpec, SpecError, _read_yaml, load_device


@dataclass(frozen=True)
class Link:
    """A link's achieved bandwidth per direction (bytes/s) and per-message latency (s)."""

    name: str
    bandwidth_bytes_per_s: float
    latency_s: float

    def transfer_s(self, nbytes: float) -> float:
        """Seconds to send ``nbytes`` point to point (latency + bytes / bandwidth)."""
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class NodeSpec:
    """One server: ``gpus_per_node`` GPUs of ``device``, NVLink groups and links (see the module docstring)."""

    name: str
    device: DeviceSpec
    gpus_per_node: int
    nvlink_group: int
    links: dict = field(default_factory=dict)       # "nvlink" / "pcie" / "network" -> Link
    num_nodes: int | None = None
    source: str = ""

    @property
    def network(self) -> Link | None:
        return self.links.get("network")

    def link_between(self, gpus) -> Link | None:
        """The slowest link among ``gpus`` (global slot indices); None for a single GPU."""
        gpus = list(gpus)
        if len(gpus) <= 1:
            return None
        nodes = {g // self.gpus_per_node for g in gpus}
        if len(nodes) > 1:
            return self.links.get("network")
        groups = {(g % self.gpus_per_node) // self.nvlink_group for g in gpus}
        return self.links["nvlink"] if len(groups) == 1 else self.links["pcie"]

    def to_dict(self) -> dict:
        return {"name": self.name, "device": self.device.name, "gpus_per_node": self.gpus_per_node,
                "nvlink_group": self.nvlink_group, "num_nodes": self.num_nodes,
                "links": {k: {"bandwidth_bytes_per_s": v.bandwidth_bytes_per_s, "latency_s": v.latency_s}
                          for k, v in self.links.items()}, "source": self.source}


def default_node(device: DeviceSpec) -> NodeSpec:
    """8 GPUs of ``device`` fully connected by its own interconnect figures; no network (see the module doc)."""
    link = Link("interconnect", device.interconnect_bandwidth_bytes_per_s or 1e12, device.interconnect_latency_s)
    return NodeSpec(f"8x{device.name}", device, 8, 8, {"nvlink": link, "pcie": link},
                    source="derived from the device spec (no node spec given)")


def known_nodes() -> list[str]:
    return sorted(_read_yaml(p)["name"] for p in (SPEC_DIR / "nodes").glob("*.yaml"))


def _positive(value, source: str, key: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SpecError(f"{source}: {key}: must be a positive number, got {value!r}") from None
    if not v > 0:
        raise SpecError(f"{source}: {key}: must be a positive number, got {value!r}")
    return v


def load_node(name_or_path) -> NodeSpec:
    """The NodeSpec of a built-in name (``cost_models/specs/nodes``) or a YAML path. Raises SpecError."""
    if isinstance(name_or_path, NodeSpec):
        return name_or_path
    path = Path(str(name_or_path))
    if not path.is_file():
        table = {}
        for p in sorted((SPEC_DIR / "nodes").glob("*.yaml")):
            data = _read_yaml(p)
            for key in [p.stem, data.get("name", p.stem), *data.get("aliases", [])]:
                table[str(key).lower()] = p
        found = table.get(str(name_or_path).lower())
        if found is None:
            raise SpecError(f"unknown node {name_or_path!r}; known nodes: {', '.join(known_nodes())} "
                            f"(or pass a YAML node spec path)")
        path = found
    data, source = _read_yaml(path), str(path)
    for key in ("name", "device", "gpus_per_node", "links"):
        if key not in data:
            raise SpecError(f"{source}: missing field {key}")
    device = load_device(data["device"])
    gpn = data["gpus_per_node"]
    if not (isinstance(gpn, int) and gpn >= 1):
        raise SpecError(f"{source}: gpus_per_node: must be a positive integer, got {gpn!r}")
    group = data.get("nvlink_group", gpn)
    if not (isinstance(group, int) and 1 <= group <= gpn and gpn % group == 0):
        raise SpecError(f"{source}: nvlink_group: must be an integer dividing gpus_per_node {gpn}, got {group!r}")
    raw = data["links"]
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: links: expected a mapping of nvlink/pcie/network")
    links = {}
    for kind, spec in raw.items():
        if kind not in ("nvlink", "pcie", "network"):
            raise SpecError(f"{source}: links: unknown link {kind!r}; known: nvlink, pcie, network")
        if not isinstance(spec, dict):
            raise SpecError(f"{source}: links.{kind}: expected bandwidth_bytes_per_s and latency_s")
        links[kind] = Link(kind, _positive(spec.get("bandwidth_bytes_per_s"), source,
                                           f"links.{kind}.bandwidth_bytes_per_s"),
                           _positive(spec.get("latency_s"), source, f"links.{kind}.latency_s"))
    if "nvlink" not in links and "pcie" not in links:
        raise SpecError(f"{source}: links: needs nvlink or pcie (the intra-node link)")
    links.setdefault("nvlink", links.get("pcie"))
    links.setdefault("pcie", links["nvlink"])
    num_nodes = data.get("num_nodes")
    if num_nodes is not None and not (isinstance(num_nodes, int) and num_nodes >= 1):
        raise SpecError(f"{source}: num_nodes: must be a positive integer, got {num_nodes!r}")
    return NodeSpec(str(data["name"]), device, gpn, group, links, num_nodes, str(data.get("source", source)))


@dataclass(frozen=True)
class Placement:
    """The GPU slots of one replica: ``stages[s]`` = the global slot indices of pipeline stage ``s``."""

    node: NodeSpec
    tp: int
    pp: int
    stages: tuple

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    @property
    def end_slot(self) -> int:
        """First slot after this replica's GPUs (where the next replica starts)."""
        return max(max(s) for s in self.stages) + 1

    @property
    def num_nodes(self) -> int:
        return len({g // self.node.gpus_per_node for s in self.stages for g in s})

    def tp_link(self, stage: int = 0) -> Link | None:
        """The link of stage ``stage``'s all-reduce (None for tp = 1)."""
        return self.node.link_between(self.stages[stage])

    def pp_link(self, stage: int) -> Link | None:
        """The link from stage ``stage`` to ``stage + 1`` (between their first GPUs)."""
        if stage + 1 >= self.pp:
            return None
        return self.node.link_between([self.stages[stage][0], self.stages[stage + 1][0]])

    def describe(self) -> str:
        nodes = sorted({g // self.node.gpus_per_node for s in self.stages for g in s})
        links = {self.tp_link(s).name for s in range(self.pp) if self.tp_link(s)}
        pp_links = {self.pp_link(s).name for s in range(self.pp - 1) if self.pp_link(s)}
        text = f"tp={self.tp} pp={self.pp} on node(s) {','.join(map(str, nodes))} of {self.node.name}"
        if links:
            text += f", all-reduce over {'/'.join(sorted(links))}"
        if pp_links:
            text += f", stages linked by {'/'.join(sorted(pp_links))}"
        return text


def place(node: NodeSpec, tp: int, pp: int, start_slot: int = 0) -> Placement:
    """Place one replica from ``start_slot`` on (see the module docstring). Raises SpecError naming ``--tp`` when
    a TP group spans nodes and the node spec has no network link."""
    gpn = node.gpus_per_node
    slot, stages = start_slot, []
    for _ in range(pp):
        if tp <= gpn:
            if slot % gpn + tp > gpn:           # does not fit in what is left of this node: next node
                slot = (slot // gpn + 1) * gpn
        else:
            if node.network is None:
                raise SpecError(f"--tp {tp}: a tensor-parallel group larger than a node ({gpn} GPUs of "
                                f"{node.name}) needs an inter-node link; the node spec has no links.network")
            if slot % gpn:
                slot = (slot // gpn + 1) * gpn
        stages.append(tuple(range(slot, slot + tp)))
        slot += tp
    placement = Placement(node, tp, pp, tuple(stages))
    if pp > 1 and placement.num_nodes > 1 and node.network is None:
        raise SpecError(f"--pp {pp}: the stages span {placement.num_nodes} nodes of {node.name} "
                        f"({gpn} GPUs each) but the node spec has no links.network")
    return placement


def place_cluster(node: NodeSpec, shapes, *, num_nodes: int | None = None, what: str = "replicas") -> list:
    """Place replicas of ``shapes`` (a list of ``(tp, pp)``) one after another; a list of Placements.

    Raises SpecError when the cluster needs more nodes than ``num_nodes`` (or the node spec's ``num_nodes``).
    """
    placements, slot = [], 0
    for tp, pp in shapes:
        p = place(node, tp, pp, slot)
        placements.append(p)
        slot = p.end_slot
    limit = num_nodes or node.num_nodes
    if limit is not None and placements:
        need = -(-placements[-1].end_slot // node.gpus_per_node)
        if need > limit:
            used = sum(p.gpus for p in placements)
            raise SpecError(f"{what}: {len(placements)} replicas need {used} GPUs on {need} nodes, but the cluster "
                            f"has {limit} node(s) of {node.gpus_per_node} GPUs ({node.name})")
    return placements
