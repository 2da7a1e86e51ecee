"""DataComp baseline filters (FORMATS §4) as two passes: scores.py streams metadata once and stores every
score (caption stats and language from text.py, image clusters from clusters.py); decide.py applies a
rule (rules.py) to the stored scores and writes a subset file. Scores are stats, decisions are cheap."""
