"""The one intervention engine: every experiment edits the model through it.

- positions: the one rule for the positions a dictionary leaves alone (BOS, massive activations)
- splice: dictionaries spliced in as hook points, exactly (reconstruction + error term)
- edits / run: feature ablations, activation maps and deltas at hooks, in one forward with
  recordings, gradient leaves and detached hooks (`run_with_edits`)
- replay: running edited activations from a layer onward over a cached prefix
- patching: feature patches at one hook from another run (`CachedRun`, `FeaturePatcher`)
"""

from circuits.engine.edits import ActivationDelta, ActivationMap, FeatureAblation, HookEdit
from circuits.engine.patching import (MODES, Bucket, CachedRun, FeaturePatcher, SetEvaluation, check_attribution,
                                      final_logits, length_buckets)
from circuits.engine.positions import MASSIVE_FACTOR, encode_codes, passthrough_positions
from circuits.engine.replay import PrefixReplay
from circuits.engine.run import EngineRun, final_position_logits, run_with_edits, unembed_positions
from circuits.engine.splice import SPLICE_HOOKS, Splice, SplicedDictionary, check_dictionary_fits, splice_dictionaries, spliced

__all__ = ["ActivationDelta", "ActivationMap", "FeatureAblation", "HookEdit", "MODES", "Bucket", "CachedRun",
           "FeaturePatcher", "SetEvaluation", "check_attribution", "final_logits", "length_buckets",
           "MASSIVE_FACTOR", "encode_codes", "passthrough_positions", "PrefixReplay", "EngineRun", "final_position_logits", "run_with_edits", "unembed_positions",
           "SPLICE_HOOKS", "Splice", "SplicedDictionary", "check_dictionary_fits", "splice_dictionaries", "spliced"]
