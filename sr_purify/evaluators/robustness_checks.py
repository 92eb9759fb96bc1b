"""Sanity checks of a robustness evaluation: a pure function of its results dict.

eps = 0 gives the clean accuracy, accuracy does not rise with eps, the adaptive attacker is not
weaker than the oblivious or transfer ones, and gradients through the purifier are finite and
non-zero. Failures print as 'SANITY FAILED: ...'.
"""

from typing import Any, Dict, List, Tuple

ATTACKERS = ('oblivious', 'adaptive', 'transfer')


def sanity_checks(results: Dict[str, Any]) -> Dict[str, Any]:
    """{'passed', 'checks': [{'check', 'ok', 'detail'}], 'failures': [detail]}.

    * eps0: every attacker's accuracy at eps = 0 equals the clean accuracy of C∘P on the same
      images (the sanity attack in `eps0`, and any listed attack with eps = 0);
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
            for attacker in ATTACKERS:
                if zero.get(attacker) is not None:
                    add(
                        'eps0',
                        abs(zero[attacker] - zero['clean']) <= 0.5 / n0,
                        f'{label}, {attacker}: {pct(zero[attacker])} at eps 0 vs clean+P '
                        f'{pct(zero["clean"])} on the same {n0} images',
                    )
        for attacker in ATTACKERS:
            accs = r.get(attacker)
            if accs is None:
                continue
            for a in meta:
                if a['eps'] == 0:
                    ok = abs(accs[a['label']] - r['clean']) <= 0.5 / n
                    add(
                        'eps0',
                        ok,
                        f'{label}, {attacker}, {a["label"]}: {pct(accs[a["label"]])} '
                        f'at eps 0 vs clean+P {pct(r["clean"])}',
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
        'eps0': 'eps = 0 gives the clean accuracy of C∘P',
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
