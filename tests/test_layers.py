"""The library's imports point one way: every module under sr_purify/ imports only from its own
layer or those below it (README "Layout"). Parsed from the source, lazy imports included."""

import ast
import pathlib

from conftest import REPO

PACKAGE = REPO / 'sr_purify'

# Lowest first. A module is matched by its longest listed prefix (dotted, below sr_purify).
LAYERS = (
    ('core', ('image_ops', 'registry', 'sharding', 'paths', 'checkpointing', 'reporting', 'perf')),
    ('models, attacks, data', ('models', 'attacks', 'sr_data', 'classification_data', 'watermark')),
    ('restore', ('restore',)),
    (
        'library',
        (
            'losses',
            'distillation',
            'purifiers',
            'evaluators',
            'inference',
            'export',
            'api',
            'extraction',
        ),
    ),
    ('training loop', ('training',)),
    ('jobs', ('jobs',)),
)
# The package's __init__ re-exports the API lazily (PEP 562 __getattr__); it sits on top.
TOP = ('__init__',)


def layer_of(module: str) -> int:
    """Index into LAYERS of a dotted module name below sr_purify ('jobs.student' -> 5)."""
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + '.')) and len(prefix) > best:
                best, found = len(prefix), index
    if found is None:
        raise AssertionError(f'sr_purify.{module} is in no layer of tests/test_layers.py')
    return found


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix('').parts
    if parts[-1] == '__init__' and len(parts) > 1:
        parts = parts[:-1]
    return '.'.join(parts)


def imported_modules(tree: ast.AST, package: str):
    """(line, dotted name below sr_purify) of every sr_purify import in a parsed module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith('sr_purify.'):
                    yield node.lineno, alias.name[len('sr_purify.') :]
                elif alias.name.split('.')[0] in ('configs', 'launch'):
                    yield node.lineno, '!' + alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:  # Relative: resolve against the importing package.
                parent = package.split('.')[: len(package.split('.')) - node.level + 1]
                base = '.'.join([p for p in parent if p] + ([base] if base else []))
                base = 'sr_purify.' + base if base else 'sr_purify'
            if base == 'sr_purify':
                for alias in node.names:  # `from sr_purify import models` imports a module.
                    yield node.lineno, alias.name
            elif base.startswith('sr_purify.'):
                yield node.lineno, base[len('sr_purify.') :]
            elif base in ('configs', 'launch') or base.startswith('configs.'):
                yield node.lineno, '!' + base


def violations():
    found = []
    for path in sorted(PACKAGE.rglob('*.py')):
        name = module_name(path)
        if name in TOP:
            continue
        own = layer_of(name)
        package = name if path.name == '__init__.py' else name.rpartition('.')[0]
        tree = ast.parse(path.read_text(), str(path))
        for line, target in imported_modules(tree, package):
            where = f'{path.relative_to(REPO)}:{line}'
            if target.startswith('!'):
                found.append(
                    f'{where}: the library imports {target[1:]} (configs and launch.py '
                    f'sit above it)'
                )
                continue
            if layer_of(target) > own:
                found.append(
                    f'{where}: {name} ({LAYERS[own][0]}) imports {target} '
                    f'({LAYERS[layer_of(target)][0]}), a higher layer'
                )
    return found


def test_every_library_import_points_down():
    problems = violations()
    assert not problems, 'imports against the layer order:\n' + '\n'.join(problems)


def test_the_checker_sees_an_upward_import(tmp_path):
    # A planted violation: a model importing a job, written as a lazy import inside a function.
    tree = ast.parse(
        'def f():\n    from sr_purify.jobs import student\n    import configs.teacher\n'
    )
    found = list(imported_modules(tree, 'models'))
    assert found == [(2, 'jobs'), (3, '!configs.teacher')]
    assert layer_of('jobs.student') > layer_of('models.edsr')
    assert layer_of('evaluators.sr') == layer_of('purifiers') > layer_of('restore')
