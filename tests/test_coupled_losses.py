"""Every loss that couples samples gives the same value and gradients for world size 1 and 2 on the same
global data, under the trainer's convention: a rank's gradient for its own rows counts 1/W (TorchRec's
gradient division), and parameter gradients are averaged over ranks (DeepSpeed)."""


import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from darec_dist.distributed.collectives import rank, sum_with_grad, world_size
from darec_dist.models.aligners.base import AlignInputs
from darec_dist.models.aligners.coupled_losses import (
    centre_statistics,
    cluster_alignment_loss,
    info_nce,
    moving_centres,
    neighbourhood_loss,
    orthogonality_loss,
    similarity_from_gram,
    similarity_gram,
    uniformity_from_sums,
    uniformity_sums,
)
from darec_dist.models.aligners.darec import DaRec, DaRecConfig
from darec_dist.models.aligners.rlmrec_con import ConConfig, RLMRecCon
from darec_dist.models.aligners.rlmrec_gen import GenConfig, RLMRecGen
from darec_dist.models.dense import DenseArch
from darec_dist.models.losses import bpr_loss
from tests.dist_helpers import results_per_world_size

N, D, DL, K = 16, 6, 10, 3


def global_similarity_loss(collab: torch.Tensor, llm: torch.Tensor) -> torch.Tensor:
    """mean((S_C - S_L)^2) of the global sample's cosine matrices, from the parts DaRec composes the same way."""
    return similarity_from_gram(sum_with_grad(similarity_gram(collab, llm)), collab.shape[0] * world_size(), collab.dtype)


def uniformity_loss(*parts: torch.Tensor) -> torch.Tensor:
    """The Wang-Isola uniformity of the global sample, from the parts DaRec composes the same way."""
    sums, n = uniformity_sums(*parts)
    return uniformity_from_sums(sum_with_grad(sums), n)


def global_data():
    g = torch.Generator().manual_seed(11)
    return {
        "c": torch.randn(N, D, generator=g, dtype=torch.float64),
        "l": torch.randn(N, DL, generator=g, dtype=torch.float64),
        "c2": torch.randn(N, D, generator=g, dtype=torch.float64),
        "l2": torch.randn(N, DL, generator=g, dtype=torch.float64),
        "l3": torch.randn(N, DL, generator=g, dtype=torch.float64),
        "ego": torch.randn(N, D, generator=g, dtype=torch.float64),
        "w": torch.rand(N, 1, generator=g, dtype=torch.float64),
        "centres": torch.randn(K, D, generator=g, dtype=torch.float64),
    }


def modules():
    torch.manual_seed(3)
    darec = DaRec(DaRecConfig(clusters=K, sample_size=N, uniformity_sample=N // 2), D, DL, seed=1).double()
    torch.manual_seed(3)
    # The open readings together: moving centres, uniformity on every part, linear projections on both sides.
    ema_config = DaRecConfig(
        clusters=K, sample_size=N, uniformity_sample=N // 2, centres="ema", uniformity_on="all",
        collab_projector="linear", llm_projector="linear",
    )
    darec_ema = DaRec(ema_config, D, DL, seed=1).double()
    torch.manual_seed(3)
    darec_matched = DaRec(DaRecConfig(clusters=K, sample_size=N, uniformity_sample=N // 2, centres="matched"), D, DL, seed=1).double()
    torch.manual_seed(3)
    darec_neighbourhood = DaRec(DaRecConfig(clusters=K, sample_size=N, uniformity_sample=N // 2, global_form="neighbourhood"), D, DL, seed=1).double()
    torch.manual_seed(3)
    darec_same_kind = DaRec(DaRecConfig(clusters=K, sample_size=N, uniformity_sample=N // 2, global_pairs="same_kind"), D, DL, seed=1).double()
    torch.manual_seed(3)
    darec_cross = DaRec(DaRecConfig(clusters=K, sample_size=N, uniformity_sample=N // 2, global_form="cross"), D, DL, seed=1).double()
    torch.manual_seed(3)
    cross_same_kind = DaRecConfig(clusters=K, sample_size=N, uniformity_sample=N // 2, global_form="cross", global_pairs="same_kind")
    darec_cross_same_kind = DaRec(cross_same_kind, D, DL, seed=1).double()
    con = RLMRecCon(ConConfig(), D, DL).double()
    gen = RLMRecGen(GenConfig(), D, DL).double()
    with torch.no_grad():
        gen.mask_token.normal_()
    return {
        "darec": darec,
        "darec_ema": darec_ema,
        "darec_matched": darec_matched,
        "darec_neighbourhood": darec_neighbourhood,
        "darec_same_kind": darec_same_kind,
        "darec_cross": darec_cross,
        "darec_cross_same_kind": darec_cross_same_kind,
        "con": con,
        "gen": gen,
    }


def darec_on_repeated_nodes(x, darec):
    """DaRec through its distinct-node path across ranks: every node fills two rows of the sample."""
    n = x["c"].shape[0]
    ids = (dist.get_rank() * n + torch.arange(n)).repeat_interleave(2)

    def twice(rows):
        return rows.repeat_interleave(2, dim=0)

    inputs = AlignInputs(
        {"user": twice(x["c"]), "pos": twice(x["c2"])}, {"user": twice(x["l"]), "pos": twice(x["l2"])}, {}, {"user": ids, "pos": ids + N}
    )
    return sum(darec(inputs).values())


def darec_on_users_shared_by_ranks(x, darec):
    """DaRec where the same users fill rows on both ranks (users 0 to 4, each on several rows of the global sample, so
    a node's count spans ranks) and every positive is its own node; a user's vectors come from one shared table."""
    n = x["c"].shape[0]
    row = rank() * n + torch.arange(n)
    users = row % 5
    shared = global_data()
    inputs = AlignInputs(
        {"user": shared["c"][users], "pos": x["c2"]}, {"user": shared["l"][users], "pos": x["l2"]}, {}, {"user": users, "pos": 5 + row}
    )
    return sum(darec(inputs).values())


def rlmrec_gen_on_masked_nodes(x, gen, keys, item_offset):
    """RLMRec-Gen's masked forward and reconstruction, where the ranks hold different numbers of masked rows
    (users 0, 3, 6, 9 and 13 and even positives are masked: 7 rows on rank 0 and 6 on rank 1 with 2 processes)."""
    n = x["c"].shape[0]
    row = rank() * n + torch.arange(n)
    masked = (row % 3 == 0) & (row < 10) | (row == 13)
    groups = {"user": x["c"], "pos": x["c2"], "neg": x["ego"]}
    inputs = AlignInputs(
        groups,
        {"user": x["l"].detach(), "pos": x["l2"].detach(), "neg": x["l3"].detach()},  # frozen LLM rows
        groups,
        {"user": keys, "pos": keys + item_offset, "neg": keys + 2 * item_offset},
        masked_weight={g: x["w"] for g in groups},
        masked={"user": masked, "pos": row % 2 == 0, "neg": masked},
    )
    return gen(gen.training_inputs(inputs))["rlmrec_gen"]


def cases(x, mods):
    """name -> (loss, module or None); x holds this rank's rows (requires_grad)."""
    inputs = AlignInputs(
        {"user": x["c"], "pos": x["c2"], "neg": x["ego"]},
        {"user": x["l"], "pos": x["l2"], "neg": x["l3"]},
        {"user": x["ego"], "pos": x["ego"], "neg": x["ego"]},
    )
    # Node keys shared by rows on both ranks (a node's rows need not hold equal vectors for the sums to agree).
    n = x["c"].shape[0]
    keys = (rank() * n + torch.arange(n)) % 5
    with_ids = AlignInputs(inputs.collab, inputs.llm, inputs.ego, {"user": keys, "pos": keys + 5, "neg": keys + 10})
    return {
        "info_nce": (info_nce(x["c"], x["c2"], 0.3), None),
        "info_nce_repeated_nodes": (info_nce(x["c"], x["c2"], 0.3, keys), None),
        "rlmrec_con_repeated_users": (mods["con"](with_ids)["rlmrec_con"], mods["con"]),
        "rlmrec_gen_repeated_nodes": (rlmrec_gen_on_masked_nodes(x, mods["gen"], keys, 5), mods["gen"]),
        "global_similarity": (global_similarity_loss(x["c"], x["c2"]), None),
        "neighbourhood": (neighbourhood_loss(x["c"], x["c2"], torch.arange(0, x["c"].shape[0], 2), 0.3), None),
        "uniformity": (uniformity_loss(x["c"]), None),
        "orthogonality": (orthogonality_loss(x["c"], x["c2"]), None),
        "cluster_alignment": (cluster_alignment_loss(x["c"], x["c2"], x["centres_param"], 0.2), None),
        "darec": (sum(mods["darec"].losses(x["c"], x["l"], torch.arange(x["c"].shape[0])).values()), mods["darec"]),
        "darec_repeated_nodes": (darec_on_repeated_nodes(x, mods["darec"]), mods["darec"]),
        "darec_ema_centres": (darec_on_repeated_nodes(x, mods["darec_ema"]), mods["darec_ema"]),
        "darec_matched_centres": (darec_on_repeated_nodes(x, mods["darec_matched"]), mods["darec_matched"]),
        "darec_neighbourhood": (darec_on_repeated_nodes(x, mods["darec_neighbourhood"]), mods["darec_neighbourhood"]),
        "darec_same_kind": (darec_on_repeated_nodes(x, mods["darec_same_kind"]), mods["darec_same_kind"]),
        "darec_cross": (darec_on_repeated_nodes(x, mods["darec_cross"]), mods["darec_cross"]),
        "darec_cross_users_on_both_ranks": (darec_on_users_shared_by_ranks(x, mods["darec_cross"]), mods["darec_cross"]),
        "darec_cross_same_kind": (darec_on_users_shared_by_ranks(x, mods["darec_cross_same_kind"]), mods["darec_cross_same_kind"]),
        "rlmrec_con": (mods["con"](inputs)["rlmrec_con"], mods["con"]),
        "rlmrec_gen": (rlmrec_gen_on_masked_nodes(x, mods["gen"], rank() * n + torch.arange(n), N), mods["gen"]),
    }


def compute(rank, world_size):
    data = global_data()
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    results = {}
    names = list(cases({k: v[rows] if k != "centres" else v for k, v in data.items()} | {"centres_param": data["centres"]}, modules()))
    for name in names:
        mods = modules()
        x = {k: v[rows].clone().requires_grad_(True) for k, v in data.items() if k != "centres"}
        x["centres_param"] = data["centres"].clone().requires_grad_(True)
        loss, module = cases(x, mods)[name]
        loss.backward()
        value = loss.detach().clone()
        dist.all_reduce(value)
        entry = {"loss": value.item() / world_size, "inputs": {}, "params": {}}
        for key in ("c", "c2", "l", "l2", "l3", "ego", "w"):
            grad = x[key].grad if x[key].grad is not None else torch.zeros_like(x[key])
            parts = [torch.empty_like(grad) for _ in range(world_size)]
            dist.all_gather(parts, (grad / world_size).contiguous())
            entry["inputs"][key] = torch.cat(parts)
        params = dict(module.named_parameters()) if module is not None else {}
        params["centres_param"] = x["centres_param"]
        for pname, p in params.items():
            grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            entry["params"][pname] = grad / world_size
        for buffer in ("centres", "collab_centres"):
            if module is not None and buffer in dict(module.named_buffers()):
                entry["params"][f"{buffer} after the step"] = getattr(module, buffer).clone()  # moved by global statistics
        results[name] = entry
    return results


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return results_per_world_size(compute, tmp_path_factory.mktemp("coupled"))


NAMES = [
    "info_nce",
    "info_nce_repeated_nodes",
    "rlmrec_con_repeated_users",
    "rlmrec_gen_repeated_nodes",
    "global_similarity",
    "neighbourhood",
    "uniformity",
    "orthogonality",
    "cluster_alignment",
    "darec",
    "darec_repeated_nodes",
    "darec_ema_centres",
    "darec_matched_centres",
    "darec_neighbourhood",
    "darec_same_kind",
    "darec_cross",
    "darec_cross_users_on_both_ranks",
    "darec_cross_same_kind",
    "rlmrec_con",
    "rlmrec_gen",
]


@pytest.mark.parametrize("name", NAMES)
def test_world_sizes_agree(outcomes, name):
    one, two = outcomes[0][name], outcomes[1][name]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-10, abs=1e-12)
    for key in one["inputs"]:
        np.testing.assert_allclose(two["inputs"][key].numpy(), one["inputs"][key].numpy(), rtol=1e-8, atol=1e-12, err_msg=key)
    for key in one["params"]:
        np.testing.assert_allclose(two["params"][key].numpy(), one["params"][key].numpy(), rtol=1e-8, atol=1e-12, err_msg=key)
    assert any(g.abs().max() > 0 for g in one["inputs"].values()), "the loss must depend on its inputs"
    # A parameter without a gradient compares as zeros at both sizes: the module's own must reach the loss too.
    module_grads = [g for key, g in one["params"].items() if key != "centres_param" and "after the step" not in key]
    assert not module_grads or any(g.abs().max() > 0 for g in module_grads), "the loss must depend on the module's parameters"


def test_global_similarity_matches_dense_matrices():
    """The Gram-form fast path equals mean((S_C - S_L)^2) of the explicit N x N cosine matrices, with gradients."""
    data = global_data()
    c, l = data["c"].clone().requires_grad_(True), data["l2"][:, :D].clone().requires_grad_(True)
    fast = global_similarity_loss(c, l)
    fast_grads = torch.autograd.grad(fast, (c, l))
    cn, ln = torch.nn.functional.normalize(c, dim=-1), torch.nn.functional.normalize(l, dim=-1)
    dense = ((cn @ cn.T - ln @ ln.T) ** 2).mean()
    dense_grads = torch.autograd.grad(dense, (c, l))
    assert fast.item() == pytest.approx(dense.item(), rel=1e-10)
    for got, want in zip(fast_grads, dense_grads):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-8, atol=1e-12)


def test_global_similarity_keeps_its_precision_near_collapse():
    """Shared parts near collapse (mean cosine about 0.9999) leave a loss 1e-7 of the Gram's squared entries: float32
    rows must still give the float64 loss and gradients (a float32 Gram gave 5.4e-9 for 1.1e-9 here)."""
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(1, 32, generator=g, dtype=torch.float64)
    c64, l64 = (direction + 0.01 * torch.randn(2, 2048, 32, generator=g, dtype=torch.float64)).unbind(0)
    c, l = c64.float().requires_grad_(True), l64.float().requires_grad_(True)
    fast = global_similarity_loss(c, l)
    fast_grads = torch.autograd.grad(fast, (c, l))
    c64, l64 = c.detach().double().requires_grad_(True), l.detach().double().requires_grad_(True)
    cn, ln = torch.nn.functional.normalize(c64, dim=-1), torch.nn.functional.normalize(l64, dim=-1)
    assert (cn @ cn.T).mean() > 0.999
    dense = ((cn @ cn.T - ln @ ln.T) ** 2).mean()
    dense_grads = torch.autograd.grad(dense, (c64, l64))
    assert fast.dtype == torch.float32 and fast.item() == pytest.approx(dense.item(), rel=1e-4)
    for got, want in zip(fast_grads, dense_grads):
        assert (got.double() - want).norm() < 1e-3 * want.norm()


def test_neighbourhood_loss_matches_explicit_distributions():
    """The neighbourhood form of the global term equals the symmetric KL of explicitly built per-anchor
    distributions (softmax over the other rows' cosines), with gradients."""
    data = global_data()
    c, l = data["c"].clone().requires_grad_(True), data["l2"].clone().requires_grad_(True)
    anchors, tau = torch.tensor([0, 3, 4, 9, 15]), 0.3
    fast = neighbourhood_loss(c, l, anchors, tau)
    fast_grads = torch.autograd.grad(fast, (c, l))
    total = 0.0
    for i in anchors.tolist():
        others = [j for j in range(N) if j != i]
        p_c = torch.softmax(torch.nn.functional.cosine_similarity(c[i : i + 1], c[others]) / tau, dim=0)
        p_l = torch.softmax(torch.nn.functional.cosine_similarity(l[i : i + 1], l[others]) / tau, dim=0)
        total = total + (p_c * (p_c / p_l).log()).sum() + (p_l * (p_l / p_c).log()).sum()
    reference = total / len(anchors)
    reference_grads = torch.autograd.grad(reference, (c, l))
    assert fast.item() == pytest.approx(reference.item(), rel=1e-10)
    for got, want in zip(fast_grads, reference_grads):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-8, atol=1e-12)


def test_uniformity_matches_pairwise_definition():
    z = global_data()["c"]
    unit = torch.nn.functional.normalize(z, dim=-1)
    distances = torch.cdist(unit, unit).square()
    off_diagonal = ~torch.eye(N, dtype=torch.bool)
    reference = torch.log(torch.exp(-2.0 * distances[off_diagonal]).mean())
    assert uniformity_loss(z).item() == pytest.approx(reference.item(), rel=1e-10)


@pytest.mark.parametrize("variant", ["darec", "darec_same_kind"])
def test_darec_projects_each_distinct_node_once_with_the_same_result(variant):
    """DaRec given row keys (repeated nodes projected once) equals DaRec treating every row as distinct."""
    g = torch.Generator().manual_seed(5)
    users, items = torch.randint(0, 5, (N,), generator=g), torch.randint(5, 12, (N,), generator=g)
    outcomes = []
    for with_ids in (False, True):
        darec = modules()[variant]
        node_c = torch.randn(12, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64).requires_grad_(True)
        node_l = torch.randn(12, DL, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        inputs = AlignInputs(
            {"user": node_c[users], "pos": node_c[items]},
            {"user": node_l[users], "pos": node_l[items]},
            {},
            {"user": users, "pos": items} if with_ids else None,
        )
        losses = darec(inputs)
        sum(losses.values()).backward()
        grads = {name: p.grad.clone() for name, p in darec.named_parameters() if p.grad is not None}
        outcomes.append(({k: v.item() for k, v in losses.items()}, node_c.grad.clone(), grads))
    (plain, plain_grad, plain_params), (distinct, distinct_grad, distinct_params) = outcomes
    assert len(torch.unique(users)) < N, "the case must repeat nodes"
    assert distinct == pytest.approx(plain, rel=1e-12)
    torch.testing.assert_close(distinct_grad, plain_grad, rtol=1e-10, atol=1e-12)
    assert plain_params.keys() == distinct_params.keys() and plain_params
    for name in plain_params:
        torch.testing.assert_close(distinct_params[name], plain_params[name], rtol=1e-10, atol=1e-12)


def test_same_kind_global_term_matches_the_explicit_blocks():
    """global_pairs=same_kind equals the mean of mean((S_C - S_L)^2) over the explicit user-user and item-item
    cosine blocks of the shared parts, with gradients."""
    torch.manual_seed(3)
    config = DaRecConfig(sample_size=N, global_pairs="same_kind", use_local=False, use_regularisers=False)
    darec = DaRec(config, D, DL).double()
    data = global_data()
    c = {"user": data["c"].clone().requires_grad_(True), "pos": data["c2"].clone().requires_grad_(True)}
    l = {"user": data["l"], "pos": data["l2"]}
    fast = darec(AlignInputs(c, l, {}))["darec_global"]
    fast_grads = torch.autograd.grad(fast, (c["user"], c["pos"]))

    def block(kind):
        cn = torch.nn.functional.normalize(darec.collab_shared(c[kind]), dim=-1)
        ln = torch.nn.functional.normalize(darec.llm_shared(l[kind]), dim=-1)
        return ((cn @ cn.T - ln @ ln.T) ** 2).mean()

    explicit = config.structure_weight * (block("user") + block("pos")) / 2
    explicit_grads = torch.autograd.grad(explicit, (c["user"], c["pos"]))
    assert fast.item() == pytest.approx(explicit.item(), rel=1e-10)
    for got, want in zip(fast_grads, explicit_grads):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-8, atol=1e-12)
    everything = DaRec(DaRecConfig(sample_size=N, use_local=False, use_regularisers=False), D, DL).double()
    everything.load_state_dict(darec.state_dict())
    assert everything(AlignInputs(c, l, {}))["darec_global"].item() != pytest.approx(fast.item(), rel=1e-3)


@pytest.mark.parametrize("pairs", ["all", "same_kind"])
def test_cross_view_global_term_matches_the_explicit_matrix(pairs):
    """global_form=cross equals the explicit cross-view matrix S = cos(c_sh, l_sh) of the sample's rows against the
    identity of nodes (the mean of (1 - S)^2 over same-node pairs plus the mean of S^2 over the others; with
    same_kind, the mean of that over the user block and the item block), with gradients, where nodes repeat in the
    sample; and, unlike the similarity form, a rotation of the LLM side moves it."""
    g = torch.Generator().manual_seed(5)
    users, items = torch.randint(0, 5, (N,), generator=g), torch.randint(5, 12, (N,), generator=g)
    node_c = torch.randn(12, D, generator=g, dtype=torch.float64).requires_grad_(True)
    node_l = torch.randn(12, DL, generator=g, dtype=torch.float64)
    torch.manual_seed(3)
    config = DaRecConfig(sample_size=N, global_form="cross", global_pairs=pairs, use_local=False, use_regularisers=False)
    darec = DaRec(config, D, DL).double()

    def fast(darec):
        inputs = AlignInputs({"user": node_c[users], "pos": node_c[items]}, {"user": node_l[users], "pos": node_l[items]}, {}, {"user": users, "pos": items})
        return darec(inputs)["darec_global"]

    def block(keys):
        cn = torch.nn.functional.normalize(darec.collab_shared(node_c[keys]), dim=-1)
        ln = torch.nn.functional.normalize(darec.llm_shared(node_l[keys]), dim=-1)
        s = cn @ ln.T
        same = keys[:, None] == keys[None, :]
        return (1 - s[same]).square().mean() + s[~same].square().mean()

    blocks = [block(torch.cat([users, items]))] if pairs == "all" else [block(users), block(items)]
    explicit = config.structure_weight * sum(blocks) / len(blocks)
    got = fast(darec)
    assert got.item() == pytest.approx(explicit.item(), rel=1e-10)
    np.testing.assert_allclose(
        torch.autograd.grad(got, node_c)[0].numpy(), torch.autograd.grad(explicit, node_c)[0].numpy(), rtol=1e-8, atol=1e-12
    )
    rotated = DaRec(config, D, DL).double()
    rotated.load_state_dict(darec.state_dict())
    rotation = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    with torch.no_grad():
        rotated.llm_shared[-1].weight.copy_(rotation @ darec.llm_shared[-1].weight)
        rotated.llm_shared[-1].bias.copy_(rotation @ darec.llm_shared[-1].bias)
    assert fast(rotated).item() != pytest.approx(got.item(), rel=1e-3)


def test_bpr_trains_the_vectors_that_rank_items():
    """With scoring=concat, BPR is taken on [c_sp, c_sh], the vectors evaluation ranks with, not on c."""
    torch.manual_seed(4)
    darec = DaRec(DaRecConfig(scoring="concat", collab_projector="linear"), D, DL).double()
    c = {g: torch.randn(6, D, dtype=torch.float64) for g in ("user", "pos", "neg")}
    l = {g: torch.randn(6, DL, dtype=torch.float64) for g in ("user", "pos")}
    losses = DenseArch(darec, reg=0.0)(AlignInputs(c, l, {}))
    scored = {g: torch.cat([darec.collab_specific(c[g]), darec.collab_shared(c[g])], dim=-1) for g in c}
    assert losses["bpr"].item() == pytest.approx(bpr_loss(scored["user"], scored["pos"], scored["neg"]).item(), rel=1e-12)
    assert losses["bpr"].item() != pytest.approx(bpr_loss(c["user"], c["pos"], c["neg"]).item(), rel=1e-3)


def test_moving_centres_match_a_plain_spherical_kmeans_step():
    """centre_statistics + moving_centres equal a per-centre loop: weighted mean direction of the nearest rows."""
    g = torch.Generator().manual_seed(8)
    x, weight = torch.randn(40, D, generator=g, dtype=torch.float64), torch.randint(1, 4, (40,), generator=g).double()
    centres = torch.nn.functional.normalize(torch.randn(K + 1, D, generator=g, dtype=torch.float64), dim=-1)
    centres[K] = centres[0]  # a tie goes to the first: centre K gets no members and must stay
    moved = moving_centres(centres, centre_statistics(x, centres, weight), momentum=0.75)
    unit = torch.nn.functional.normalize(x, dim=-1)
    nearest = [max(range(K + 1), key=lambda k: float(unit[i] @ centres[k])) for i in range(40)]
    for k in range(K + 1):
        members = [i for i in range(40) if nearest[i] == k]
        if not members:
            torch.testing.assert_close(moved[k], centres[k])
            continue
        mean = sum(weight[i] * unit[i] for i in members)
        want = torch.nn.functional.normalize(0.75 * centres[k] + 0.25 * mean / mean.norm(), dim=0)
        torch.testing.assert_close(moved[k], want, rtol=1e-10, atol=1e-12)
    assert (moved - centres).abs().max() > 1e-3, "some centre must move"


def test_matched_centre_loss_matches_a_plain_permutation_search():
    """Per-side clusters paired by the best of all K! matchings, then 1 - cos of the paired cluster means."""
    import itertools

    from darec_dist.models.aligners.coupled_losses import matched_centre_loss

    g = torch.Generator().manual_seed(5)
    c, l = torch.randn(40, D, generator=g, dtype=torch.float64), torch.randn(40, D, generator=g, dtype=torch.float64)
    c_centres, l_centres = torch.randn(K, D, generator=g, dtype=torch.float64), torch.randn(K, D, generator=g, dtype=torch.float64)
    c.requires_grad_(True)
    fast = matched_centre_loss(centre_statistics(c, c_centres), centre_statistics(l, l_centres), c_centres, l_centres)
    (fast_grad,) = torch.autograd.grad(fast, c)

    unit = torch.nn.functional.normalize
    similarity = unit(c_centres, dim=-1) @ unit(l_centres, dim=-1).T
    best = max(itertools.permutations(range(K)), key=lambda p: sum(similarity[i, p[i]].item() for i in range(K)))

    def means(x, centres):
        nearest = (unit(x, dim=-1) @ unit(centres, dim=-1).T).argmax(-1)
        return [unit(x, dim=-1)[nearest == k].mean(0) if (nearest == k).any() else None for k in range(K)]

    c_means, l_means = means(c, c_centres), means(l, l_centres)
    gaps = [1 - torch.nn.functional.cosine_similarity(c_means[k], l_means[best[k]], dim=0) for k in range(K) if c_means[k] is not None and l_means[best[k]] is not None]
    plain = torch.stack(gaps).mean()
    (plain_grad,) = torch.autograd.grad(plain, c)
    assert best != tuple(range(K)), "the case must need a matching other than the identity"
    assert fast.item() == pytest.approx(plain.item(), rel=1e-10)
    np.testing.assert_allclose(fast_grad.numpy(), plain_grad.numpy(), rtol=1e-8, atol=1e-12)


def test_info_nce_matches_the_plain_formula():
    """-log softmax of the own positive among all positives, written out: value and gradients."""
    g = torch.Generator().manual_seed(3)
    anchors, positives = (torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    tau = 0.2
    fast = info_nce(anchors, positives, tau)
    fast_grads = torch.autograd.grad(fast, (anchors, positives))
    a = anchors / anchors.norm(dim=1, keepdim=True)
    p = positives / positives.norm(dim=1, keepdim=True)
    cos = a @ p.T / tau
    plain = -(cos.diagonal() - torch.log(torch.exp(cos).sum(dim=1))).mean()
    plain_grads = torch.autograd.grad(plain, (anchors, positives))
    torch.testing.assert_close(fast, plain)
    for f, p_ in zip(fast_grads, plain_grads):
        torch.testing.assert_close(f, p_)


def test_info_nce_counts_each_node_once_among_the_negatives():
    """With node keys, -log of the own positive against each distinct node's positive once, written out: a node on
    three rows is one negative, not three (two of them as close as the anchor's own positive)."""
    g = torch.Generator().manual_seed(4)
    ids = torch.tensor([0, 1, 0, 2, 3, 0, 1, 4])
    anchors = torch.randn(5, 6, generator=g, dtype=torch.float64)[ids].requires_grad_(True)
    positives = torch.randn(5, 6, generator=g, dtype=torch.float64)[ids].requires_grad_(True)
    tau = 0.3
    fast = info_nce(anchors, positives, tau, ids)
    fast_grads = torch.autograd.grad(fast, (anchors, positives))
    a = anchors / anchors.norm(dim=1, keepdim=True)
    p = positives / positives.norm(dim=1, keepdim=True)
    first = [ids.tolist().index(node) for node in range(5)]  # one row of each node
    cos = a @ p[first].T / tau
    plain = -(cos[torch.arange(8), ids] - torch.log(torch.exp(cos).sum(dim=1))).mean()
    plain_grads = torch.autograd.grad(plain, (anchors, positives))
    torch.testing.assert_close(fast, plain)
    torch.testing.assert_close(fast_grads[0], plain_grads[0])
    per_node = [torch.zeros(5, 6, dtype=torch.float64).index_add_(0, ids, grad) for grad in (fast_grads[1], plain_grads[1])]
    torch.testing.assert_close(*per_node)  # a node's rows share its positive: what matters is their sum
    assert not torch.isclose(info_nce(anchors, positives, tau), plain)  # the rows as negatives: another loss
    # Rows of one node with different positives: the node is its first row's, still a cross-entropy (>= 0).
    assert info_nce(torch.eye(3), torch.eye(3), 0.1, torch.tensor([0, 0, 1])) >= 0


def test_more_centres_than_sampled_rows_are_refused_by_name():
    """k-means cannot place K centres among fewer rows (it returned fewer, and the copy into K failed on shapes):
    refused when the config is read (K > N) and when the trainer sizes DaRec's sample for its batch and world."""
    from darec_dist.config import ConfigError

    with pytest.raises(ValueError, match=r"align.darec.clusters \(8\) must be at most align.darec.sample_size \(4\)"):
        DaRecConfig(clusters=8, sample_size=4)
    darec = DaRec(DaRecConfig(clusters=8, sample_size=N, uniformity_sample=4), D, DL, seed=1)
    assert darec.llm_rows(local_batch=2, world=2) == 2  # 2 users and 2 positives on each of 2 ranks: 8 rows
    with pytest.raises(ConfigError, match="align.darec.clusters=8: DaRec's sample holds 4 rows per step over 1 ranks"):
        darec.llm_rows(local_batch=2, world=1)


def test_kmeans_starts_on_distinct_points_when_nodes_fill_several_rows():
    """Rows repeat when a node fills several sample rows; two centres started on one node's rows would stay equal.
    Without iterations the centres are the start itself: k distinct points of the input."""
    from darec_dist.models.aligners.coupled_losses import kmeans

    g = torch.Generator().manual_seed(3)
    nodes = torch.nn.functional.normalize(torch.randn(4, D, generator=g, dtype=torch.float64), dim=-1)
    points = nodes.repeat_interleave(torch.tensor([40, 30, 1, 1]), dim=0)  # two rare nodes among many repeats
    for seed in range(20):
        for iterations in (0, 5):
            centres = kmeans(points, 4, iterations, seed)
            cos = centres @ centres.T
            assert (cos - torch.eye(4, dtype=cos.dtype)).max() < 1 - 1e-9, (seed, iterations)
        start = kmeans(points, 4, 0, seed)
        assert torch.cdist(start, nodes).min(1).values.max() < 1e-12, "the start must be input points"


@pytest.mark.parametrize("method", ["rlmrec-con", "rlmrec-gen", "darec"])
def test_xavier_projector_init_draws_every_projection_as_rlmrec_does(method):
    """align.projector_init=xavier: RLMRec's xavier_uniform_ weights (variance 2 / (fan_in + fan_out)) on every
    projection, biases left at PyTorch's default; the default keeps PyTorch's weights (bound 1 / sqrt(fan_in))."""
    from darec_dist.models.aligners import AlignConfig, build_aligner

    def linears(init):
        torch.manual_seed(0)
        aligner = build_aligner(AlignConfig(method=method, projector_init=init), 64, 384, input_dim=64)
        return [m for m in aligner.modules() if isinstance(m, torch.nn.Linear)]

    xavier, default = linears("xavier"), linears("torch")
    assert len(xavier) == len(default) >= 2
    for drawn, kept in zip(xavier, default):
        fan_out, fan_in = drawn.weight.shape
        assert drawn.weight.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5
        assert drawn.weight.std().item() == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.1)
        assert kept.weight.abs().max() <= 1 / fan_in**0.5
        if drawn.bias is not None:
            assert drawn.bias.abs().max() <= 1 / fan_in**0.5


@pytest.mark.parametrize("temperature", [0.2, 0.01])
def test_cluster_alignment_is_the_symmetric_kl_even_at_low_temperature(temperature):
    """The loss against KL written out in float64 from the soft assignments. At 0.01 some probabilities fall below
    1e-12, where the log of a clamped softmax capped the loss (36.5 against 79.9 in a review's check)."""
    torch.manual_seed(0)
    c, l, centres = torch.randn(64, 8), torch.randn(64, 8), torch.randn(4, 8)
    q_c = torch.softmax(F.normalize(c.double(), dim=-1) @ F.normalize(centres.double(), dim=-1).T / temperature, -1)
    q_l = torch.softmax(F.normalize(l.double(), dim=-1) @ F.normalize(centres.double(), dim=-1).T / temperature, -1)
    plain = ((q_c * (q_c / q_l).log()).sum(-1) + (q_l * (q_l / q_c).log()).sum(-1)).mean()
    assert torch.isfinite(plain)
    assert cluster_alignment_loss(c, l, centres, temperature).item() == pytest.approx(plain.item(), rel=1e-4)
