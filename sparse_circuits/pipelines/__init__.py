"""The shared pipelines the command, the demo and notebooks run, each an ordinary function on a loaded model.

train     harvest activations at hook points and train SAEs from that one harvest (`train_on_model`)
evaluate  measure saved dictionary folders on held-out text (`evaluate_folders`)
ioi       the IOI benchmark with an SAE found, given or trained, and baselines cached per folder (`run_ioi`)
trace     trace a feature or logit and export the graph (`trace_feature`, `trace_and_export`, `export_saved_graph`)
dashboard an offline feature dashboard site for a dictionary or a baseline basis (`build_dashboard`)

Import the submodule you need (`from sparse_circuits.pipelines.train import train_on_model`).
"""
