"""Evaluators: SR quality and cost (`sr`), attacks on a classifier (`attacks`), robustness of a
purifier under oblivious, adaptive and transfer attackers (`robustness`), and robustness of SR
networks to perturbed inputs, bare and behind the SR defences (`sr_robustness`, `sr_defences`)."""
