"""The map of doc/design.rst holds: imports point down, rooms stay small.

The table "What each may import" is read from doc/design.rst itself, so
the page and the code cannot drift apart.  Every library module (not the
tests) is read with ``ast``: what it imports of zodbblob, absolutely or
relatively, must be in the row of its package, and no module may be over
600 lines, no class over 400.
"""

import ast
import os
import re
import unittest

import zodbblob

PACKAGE = os.path.dirname(zodbblob.__file__)
DESIGN = os.path.join(PACKAGE, os.pardir, os.pardir, 'doc', 'design.rst')
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400
NAME = re.compile(r'``([a-z_]+)``')


def may_import():
    """``{room: {rooms it may import}}`` from the table of design.rst."""
    with open(DESIGN) as f:
        text = f.read()
    heading = 'package or module         may import (of zodbblob)\n'
    table = text[text.index(heading):].split('\n\n', 1)[0]
    rows = [line for line in table.splitlines()[2:]
            if line and not line.startswith('=')]
    allowed = {}
    for row in rows:
        [room] = NAME.findall(row[:26])
        # Words in parentheses, and the row's prose, say why, not what.
        said = re.sub(r'\([^)]*\)', '', row[26:])
        allowed[room] = set(re.findall(r'\b[a-z_]+\b', said)) - {
            'nothing', 'never', 'the', 'command', 'line'}
    return allowed


def library_modules():
    """``(room, dotted name, path)`` of every module outside the tests."""
    for directory, dirs, names in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs
                         if d != 'tests' and not d.startswith(('.', '_')))
        for name in sorted(names):
            if name.endswith('.py'):
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, PACKAGE)[:-3].split(os.sep)
                yield parts[0], '.'.join(['zodbblob'] + parts), path


def imported_rooms(tree, module):
    """The rooms of zodbblob that a module's code imports."""
    package = module.split('.')
    if not module.endswith('__init__'):
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                above = package[:len(package) - (node.level - 1)]
                base = '.'.join(above + ([base] if base else []))
            names = [base]
            if base == 'zodbblob':
                names = [f'zodbblob.{a.name}' for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split('.')
            if parts[0] == 'zodbblob' and len(parts) > 1:
                yield parts[1]


class MapTests(unittest.TestCase):

    def test_the_table_names_every_room(self):
        allowed = may_import()
        self.assertEqual(allowed['testing'], {'cli', 'storage', 'objectstore'})
        self.assertEqual(allowed['interfaces'], set())
        rooms = {room for room, _, _ in library_modules()}
        self.assertEqual(rooms - set(allowed), set())
        self.assertEqual(set().union(*allowed.values()) - rooms, set())

    def test_imports_point_down_the_map(self):
        allowed = may_import()
        wrong = []
        for room, module, path in library_modules():
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for other in set(imported_rooms(tree, module)):
                if other != room and other not in allowed.get(room, ()):
                    wrong.append(f'{path} imports zodbblob.{other}')
        self.assertEqual(wrong, [])

    def test_a_relative_import_counts_as_the_absolute_one(self):
        tree = ast.parse('from ..cli import main\nfrom . import catalog\n')
        self.assertEqual(
            list(imported_rooms(tree, 'zodbblob.storage.wrapper')),
            ['cli', 'storage'])

    def test_no_module_over_600_lines_no_class_over_400(self):
        large = []
        for _, _, path in library_modules():
            with open(path) as f:
                text = f.read()
            lines = text.count('\n')
            if lines > MAX_MODULE_LINES:
                large.append(f'{path}: {lines} lines')
            for node in ast.walk(ast.parse(text, path)):
                if isinstance(node, ast.ClassDef):
                    size = node.end_lineno - node.lineno + 1
                    if size > MAX_CLASS_LINES:
                        large.append(f'{path}: class {node.name} {size} lines')
        self.assertEqual(large, [])
