"""Propagation rows from Spark against a dense numpy computation."""

import numpy as np
import pytest

from spark_jobs.config import GraphConfig
from spark_jobs.graph import node_degrees, normalised_adjacency, propagation_rows, train_edges
from tests.dense_reference import dense_adjacency

NUM_USERS, NUM_ITEMS = 12, 9


@pytest.fixture(scope="module")
def edges():
    rng = np.random.default_rng(7)
    pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, NUM_USERS, 60), rng.integers(0, NUM_ITEMS, 60))}
    pairs.discard((0, 0))
    # user 11 and item 8 stay isolated: their rows must hold just the a_0 self entry.
    return sorted((u, i) for u, i in pairs if u != NUM_USERS - 1 and i != NUM_ITEMS - 1)


def top_k_rows(matrix, k):
    out = np.zeros_like(matrix)
    for r, row in enumerate(matrix):
        nz = np.flatnonzero(row)
        keep = nz[np.lexsort((nz, -row[nz]))][:k]
        out[r, keep] = row[keep]
    return out


def spark_rows(spark, edges, cfg):
    train = train_edges(spark.createDataFrame(edges, "user long, item long"))
    n = NUM_USERS + NUM_ITEMS
    degrees = node_degrees(train, NUM_USERS, n, spark, cfg.self_loops)
    adjacency = normalised_adjacency(train, degrees, NUM_USERS, cfg.self_loops)
    rows = propagation_rows(spark, adjacency, n, cfg, partitions=3).collect()
    dense = np.zeros((n * cfg.blocks(), n))
    for r in rows:
        dense[r["src"], r["dst"]] = r["w"]
    return dense, len(rows)


def test_repeated_train_pairs_are_one_edge(spark, edges):
    """clean.dedupe=false keeps repeated interactions in train: the graph still has each pair once."""
    cfg = GraphConfig(layers=2, top_k=None, layer_weights=[0.4, 0.3, 0.3])
    once, _ = spark_rows(spark, edges, cfg)
    twice, _ = spark_rows(spark, edges + edges[::3], cfg)
    np.testing.assert_allclose(twice, once, rtol=1e-12, atol=1e-14)


def test_exact_rows_equal_dense_powers(spark, edges):
    cfg = GraphConfig(layers=3, top_k=None, layer_weights=[0.4, 0.3, 0.2, 0.1])
    got, _ = spark_rows(spark, edges, cfg)
    a = dense_adjacency(NUM_USERS, NUM_ITEMS, edges)
    expected = sum(w * np.linalg.matrix_power(a, k) for k, w in enumerate(cfg.layer_weights))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    assert got[NUM_USERS - 1, NUM_USERS - 1] == pytest.approx(0.4)
    assert np.count_nonzero(got[NUM_USERS - 1]) == 1


def test_per_layer_rows_with_self_loops_equal_dense_powers(spark, edges):
    # GCCF's rows: each power of the self-loop-normalised adjacency kept apart, block k = rows k*n .. (k+1)*n-1.
    cfg = GraphConfig(layers=2, top_k=None, self_loops=True, per_layer=True)
    got, _ = spark_rows(spark, edges, cfg)
    a = dense_adjacency(NUM_USERS, NUM_ITEMS, edges, self_loops=True)
    expected = np.concatenate([np.linalg.matrix_power(a, k) for k in range(cfg.layers + 1)])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    isolated = NUM_USERS - 1  # its only neighbour is itself: (A + I) normalised by degree 1 keeps it at 1
    assert [got[k * len(a) + isolated, isolated] for k in range(3)] == [1.0, 1.0, 1.0]


def test_top_k_rows_keep_the_k_largest(spark, edges):
    k = 4
    a = dense_adjacency(NUM_USERS, NUM_ITEMS, edges)
    # One hop: per-hop pruning cannot change values, so the kept entries are exactly the K largest of each exact row.
    got, count = spark_rows(spark, edges, GraphConfig(layers=1, top_k=k))
    exact = 0.5 * np.eye(len(a)) + 0.5 * a
    for r in range(len(a)):
        kept = np.sort(got[r][got[r] != 0])[::-1]
        largest = np.sort(exact[r][exact[r] != 0])[::-1][:k]
        np.testing.assert_allclose(kept, largest, rtol=1e-12)
        # ... at their own columns (whichever of tied entries was kept, its value is the exact row's there).
        np.testing.assert_allclose(got[r][got[r] != 0], exact[r][got[r] != 0], rtol=1e-12)
    assert count == sum(min(k, np.count_nonzero(row)) for row in exact)


def test_top_k_prunes_after_every_hop(spark, edges):
    k = 3
    got, _ = spark_rows(spark, edges, GraphConfig(layers=3, top_k=k))
    a = dense_adjacency(NUM_USERS, NUM_ITEMS, edges)
    frontier, total = np.eye(len(a)), 0.25 * np.eye(len(a))
    for _ in range(3):
        frontier = top_k_rows(frontier @ a, k)
        total = total + 0.25 * frontier
    expected = top_k_rows(total, k)
    # Entry by entry, columns included: both keep ties by the lower column (spark_jobs/graph.py, top_k_rows above).
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14)
    assert (np.count_nonzero(got, axis=1) <= k).all()


def test_neighbour_cap_bounds_expansion_and_is_exact_when_loose(spark, edges):
    from spark_jobs.graph import sample_neighbors

    train = train_edges(spark.createDataFrame(edges, "user long, item long"))
    n = NUM_USERS + NUM_ITEMS
    degrees = node_degrees(train, NUM_USERS, n, spark)
    adjacency = normalised_adjacency(train, degrees, NUM_USERS)
    loose = sample_neighbors(adjacency, degrees, limit=1000, seed=1).orderBy("src", "dst").collect()
    assert [(r["src"], r["dst"], r["a"]) for r in loose] == [(r["src"], r["dst"], r["a"]) for r in adjacency.orderBy("src", "dst").collect()]
    tight = sample_neighbors(adjacency, degrees, limit=2, seed=1).collect()
    per_source = {}
    for r in tight:
        per_source[r["src"]] = per_source.get(r["src"], 0) + 1
    assert max(per_source.values()) == 2
    # Scaled by degree / limit: each sampled hop keeps the row's total weight in expectation.
    deg = {r["node"]: r["degree"] for r in degrees.collect()}
    full = {(r["src"], r["dst"]): r["a"] for r in adjacency.collect()}
    for r in tight:
        assert r["a"] == pytest.approx(full[(r["src"], r["dst"])] * max(deg[r["src"]] / 2, 1.0))
