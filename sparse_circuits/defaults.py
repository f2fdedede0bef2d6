"""Plain constants the command line shows in --help, kept free of torch so that --help stays fast.

Each copy of a library constant is checked against the library by tests/test_app_cli.py.
"""

DEFAULT_MODEL = "smollm2-135m"  # = circuits.models.DEFAULT_MODEL
REGISTRY_MODEL_NAMES = ("smollm2-135m", "gemma3-270m")  # = tuple(circuits.model_sources.REGISTRY_MODELS)
DEFAULT_CORPUS = "registry"
# --arch choice -> registered architecture name (= the names in sae.registry)
ARCHITECTURES = {"relu": "standard", "topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu"}
DEVICE_HELP = "cpu, cuda, cuda:1 ... ('auto': cuda if available, else cpu)"

IOI_BASELINES = ("pca", "ica", "neurons", "random", "dense")  # = tasks.ioi.BASELINE_NAMES
IOI_KL_TARGET_FRACTION = 0.25  # = tasks.ioi.SearchSettings().kl_target_fraction
IOI_TRAIN_TOKENS = 100_000  # the ioi command's own SAE: tied ReLU, ratio 4; on SmolLM2 blocks.18 these settings
IOI_TRAIN_L1 = 1e-3  # gave L0 188, FVU 0.22 (2e-3: L0 80, FVU 0.35, too lossy to reach the KL target; lr 1e-3: FVU ~0.5)
IOI_TRAIN_LR = 3e-3
IOI_TRAIN_EPOCHS = 16

PROBE_BASELINES = ("neurons", "pca", "ica", "random")  # = tasks.probing.PROBE_BASELINES
PROBE_KS = (1, 2, 4, 8, 16)  # = tasks.probing.DEFAULT_KS

ERASE_METHODS = ("sae_attribution", "sae_activation", "sae_random", "random_dictionary", "leace",
                 "mean_projection")  # = tasks.erasure.METHODS
ERASE_KS = (1, 2, 4, 8, 16, 32)  # = tasks.erasure.DEFAULT_KS
ERASE_POSITIONS = ("name", "final", "all")  # = tasks.erasure.SETTINGS
ERASE_STRENGTHS = (0.25, 0.5, 1.0)  # = tasks.erasure.DEFAULT_STRENGTHS
ERASE_REMOVAL_LEVELS = (0.25, 0.5, 0.75, 0.9)  # = tasks.erasure.DEFAULT_REMOVAL_LEVELS

# The training recipe (issue 14; sae.training.TrainingConfig): untied ReLU and TopK SAEs train with free decoder
# rows started at this norm (SAELens' recipe, better FVU at equal L0: results/saelens/ablation.md); tied SAEs keep
# the paper's unit-norm rows.
TRAIN_DECODER_INIT_NORM = 0.1  # = sae.training.config.AUTO_DECODER_INIT_NORM
