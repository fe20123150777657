"""angelmed: run, train, serve and evaluate AntAngelMed / Ling-2.0 (BailingMoeV2) medical MoE models."""

__version__ = "0.1.0"

MEDICAL_ADVISORY = (
    "Medical advisory: angelmed models are research software. Their answers may be wrong or incomplete "
    "and are not a diagnosis or a substitute for a qualified clinician. In an emergency call your local "
    "emergency number."
)
