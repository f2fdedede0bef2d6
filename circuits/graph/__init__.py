"""The circuit graph: a plain `networkx.DiGraph` of features, with pruning, paths and JSON files.

Tracing fills the graph; this package only defines what it holds (schema), trims it (pruning),
finds its strongest paths (paths) and saves it (io). Any networkx algorithm works on it directly.

Schema
------
Edges point upstream -> downstream (cause -> effect).

Node ids are strings:
    feature  "{hook}:{index}"    e.g. "blocks.12.hook_resid_post:1234"
    error    "{hook}:error"      the dictionary's reconstruction error at that hook
    token    "token:{position}"  an input token
    output   "output", or a logit target such as "logit: Mary"

Node attributes (every node has all of them when built with the helpers below):
    kind               "feature" | "error" | "token" | "output"
    hook               TransformerLens hook name ("" for tokens and the output)
    layer              int: the block; tokens -1, the output n_layers
    index              int: the feature index; the position for tokens; -1 if none
    activation         float: mean activation over the traced contexts
    label              str: a human description, may be ""; for tokens the token text
    top_tokens         list[str]: tokens the feature fires on most
    promoted_tokens    list[str]: tokens whose logits the feature raises directly (may be empty)
    suppressed_tokens  list[str]: tokens whose logits it lowers directly (may be empty)
    contexts           list of {"tokens": [str, ...], "position": int, "activation": float}:
                       top-activating contexts, the activating token at `position`
    is_target          bool: this node is the graph's target

Edge attributes:
    effect  float, signed: how much the source changes the target
    weight  float: abs(effect)
    sign    +1 or -1 (+1 for a zero effect)
    method  "attribution" (gradient estimate) | "ablation" (exact patching)

Graph attributes: `target` (the target node id), `method`, `model`, plus free-form metadata.

Node order, wherever one is needed (files, layouts): by layer, then kind (token, feature, error,
output), then index, then id. See `sorted_nodes`.

Files are networkx node-link JSON (edges under the key "edges") with two extra top-level keys,
`schema` and `schema_version`, that networkx ignores.
"""

from circuits.graph.io import (graph_from_node_link, graph_to_json_text, graph_to_node_link, load_graph_json,
                               save_graph_json, validate_graph)
from circuits.graph.paths import CircuitPath, format_paths, strongest_paths
from circuits.graph.pruning import (node_influence, prune_by_cumulative_influence, prune_by_threshold,
                                    prune_top_k_per_node, remove_dangling)
from circuits.graph.schema import (METHODS, NODE_KINDS, OUTPUT_NODE, SCHEMA_NAME, SCHEMA_VERSION, GraphFormatError,
                                   add_edge, add_error_node, add_feature_node, add_node, add_output_node,
                                   add_token_node, describe_node, error_node_id, feature_node_id, node_order_key,
                                   node_title, printable, quote_token, set_target, sorted_edges, sorted_nodes,
                                   target_node, token_node_id)

__all__ = [
    # schema
    "NODE_KINDS", "METHODS", "SCHEMA_NAME", "SCHEMA_VERSION", "OUTPUT_NODE", "GraphFormatError",
    "feature_node_id", "error_node_id", "token_node_id", "add_node", "add_feature_node", "add_error_node",
    "add_token_node", "add_output_node", "set_target", "add_edge", "target_node", "node_order_key",
    "sorted_nodes", "sorted_edges", "quote_token", "printable", "node_title", "describe_node",
    # pruning
    "remove_dangling", "prune_by_threshold", "prune_top_k_per_node", "node_influence",
    "prune_by_cumulative_influence",
    # paths
    "CircuitPath", "strongest_paths", "format_paths",
    # io
    "validate_graph", "graph_to_node_link", "graph_from_node_link", "save_graph_json", "graph_to_json_text",
    "load_graph_json",
]
