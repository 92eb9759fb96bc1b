"""Evaluators: SR quality and cost (`sr`), attacks on a classifier (`attacks`), robustness of a
purifier under oblivious, adaptive and transfer attackers (`robustness`)."""
