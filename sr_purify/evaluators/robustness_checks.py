"""Sanity checks of a robustness evaluation: a pure function of its results dict.

eps = 0 and clean C∘P agree with an independent forward pass of C∘P, accuracy does not rise with
eps, the adaptive attacker is not weaker than the oblivious or transfer ones, and gradients
through the purifier are finite and non-zero. Failures print as 'SANITY FAILED: ...'.
"""

from typing import Any, Dict, List, Tuple

ATTACKERS = ('oblivious', 'adaptive', 'transfer')


def sanity_checks(results: Dict[str, Any]) -> Dict[str, Any]:
    """{'passed', 'checks': [{'check', 'ok', 'detail'}], 'failures': [detail]}.

    * eps0: every attacker's predictions at eps = 0 (the sanity attack in `eps0`) equal, sample by
      sample, those of an independent forward pass of C∘P on the same images (its own jitted
      function, labels read from the split, the same draw for a random P); so does the table's
      clean C∘P (`reference`), and any listed attack with eps = 0 matches its accuracy. Tolerance:
      no sample may differ except near-ties of the reference (top-2 logits within 1e-4 of the
      largest |logit|: two compiled programs may round them either way), and the accuracies may
      differ by at most the near-ties. Results without per-sample counts compare accuracies,
      within half a sample;
    * monotone: per purifier, attacker and attack (name, norm, steps), accuracy does not rise with
      eps (clean C∘P is the eps = 0 point), tolerance one sample;
    * adaptive_vs_oblivious / adaptive_vs_transfer: the white-box attacker is not weaker than the
      oblivious or the transfer attacker, tolerance one sample;
    * gradient: d loss / dx through C∘P (BPDA where needed) is finite and non-zero.
    """
    n = max(int(results['examples']), 1)
    tol = 1.0 / n + 1e-9
    checks = []

    def add(check, ok, detail):
        checks.append({'check': check, 'ok': bool(ok), 'detail': detail})

    meta = results['attacks']
    pct = lambda v: f'{100 * v:.1f}%'
    for label, r in results['purifiers'].items():
        zero = r.get('eps0')
        if zero:
            n0 = max(int(zero['examples']), 1)
            ties0 = int(zero.get('near_ties', 0))
            mismatches = zero.get('mismatches') or {}
            for attacker in ATTACKERS:
                if zero.get(attacker) is None:
                    continue
                differ = mismatches.get(attacker)
                ok = abs(zero[attacker] - zero['clean']) <= (ties0 + 0.5) / n0
                if differ is not None:
                    ok = ok and differ == 0
                add(
                    'eps0',
                    ok,
                    f'{label}, {attacker}: {pct(zero[attacker])} at eps 0 vs '
                    f'{pct(zero["clean"])} by an independent forward pass of C∘P on the same '
                    f'{n0} images'
                    + ('' if differ is None else f', {differ} samples differ')
                    + (f' ({ties0} near-ties not counted)' if ties0 else ''),
                )
        reference = r.get('reference')
        if reference:
            ties = int(reference.get('near_ties', 0))
            add(
                'eps0',
                reference['mismatches'] == 0
                and abs(r['clean'] - reference['clean']) <= (ties + 0.5) / n,
                f'{label}: clean+P {pct(r["clean"])} as scored vs {pct(reference["clean"])} by '
                f'an independent forward pass of C∘P, {reference["mismatches"]} samples differ'
                + (f' ({ties} near-ties not counted)' if ties else ''),
            )
        clean_ref = reference['clean'] if reference else r['clean']
        ties_ref = int(reference.get('near_ties', 0)) if reference else 0
        for attacker in ATTACKERS:
            accs = r.get(attacker)
            if accs is None:
                continue
            for a in meta:
                if a['eps'] == 0:
                    ok = abs(accs[a['label']] - clean_ref) <= (ties_ref + 0.5) / n
                    add(
                        'eps0',
                        ok,
                        f'{label}, {attacker}, {a["label"]}: {pct(accs[a["label"]])} '
                        f'at eps 0 vs {pct(clean_ref)} by '
                        + ('an independent forward pass of C∘P' if reference else 'clean+P'),
                    )
            groups: Dict[Tuple, List] = {}
            for a in meta:
                if a['eps'] > 0:
                    groups.setdefault((a['name'], a['norm'], a['steps']), []).append(a)
            for group in groups.values():
                points = [(0.0, r['clean'], 'clean+P')] + sorted(
                    (a['eps'], accs[a['label']], a['label']) for a in group
                )
                for (e0, a0, l0), (e1, a1, l1) in zip(points, points[1:]):
                    if e1 > e0:
                        add(
                            'monotone',
                            a1 <= a0 + tol,
                            f'{label}, {attacker}: {pct(a1)} at {l1} vs {pct(a0)} at {l0}',
                        )
        for a in meta:
            if a['eps'] == 0:
                continue
            ad = r['adaptive'][a['label']]
            for other in ('oblivious', 'transfer'):
                if r.get(other) is None:
                    continue
                ot = r[other][a['label']]
                add(
                    f'adaptive_vs_{other}',
                    ad <= ot + tol,
                    f'{label}, {a["label"]}: adaptive {pct(ad)} vs {other} {pct(ot)}',
                )
        g = r.get('gradient')
        if g is not None:
            add(
                'gradient',
                g['finite'] and g['norm'] > 0,
                f'{label}: |d loss / dx| = {g["norm"]:.3g} ({g["via"]}), '
                f'{"finite" if g["finite"] else "NOT finite"}',
            )
    failures = [c['detail'] for c in checks if not c['ok']]
    return {'passed': not failures, 'checks': checks, 'failures': failures}


def sanity_lines(sanity: Dict[str, Any]) -> List[str]:
    """Summary lines, one per check kind, and a loud line per failure."""
    lines = []
    kinds = []
    for c in sanity['checks']:
        if c['check'] not in kinds:
            kinds.append(c['check'])
    describe = {
        'eps0': 'eps = 0 and clean+P match an independent forward pass of C∘P',
        'monotone': 'accuracy does not rise with eps (tolerance one sample)',
        'adaptive_vs_oblivious': 'adaptive accuracy <= oblivious (tolerance one sample)',
        'adaptive_vs_transfer': 'adaptive accuracy <= transfer (tolerance one sample)',
        'gradient': 'gradients through C∘P are finite and non-zero',
    }
    for kind in kinds:
        group = [c for c in sanity['checks'] if c['check'] == kind]
        bad = [c for c in group if not c['ok']]
        status = 'ok' if not bad else 'FAILED'
        lines.append(
            f'sanity {status}: {describe.get(kind, kind)} '
            f'({len(group) - len(bad)}/{len(group)} pass)'
        )
    for detail in sanity['failures']:
        lines.append(f'SANITY FAILED: {detail}')
    return lines
