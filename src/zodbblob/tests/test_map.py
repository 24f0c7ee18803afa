"""The map of doc/design.rst holds: imports point down, rooms stay small.

Every library module (not the tests) is read with ``ast``: what it
imports of zodbblob must be in the row of its package in the map, and no
module may be over 600 lines, no class over 400.
"""

import ast
import os
import unittest

import zodbblob

PACKAGE = os.path.dirname(zodbblob.__file__)
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400

# The table "What each may import" of doc/design.rst.
MAY_IMPORT = {
    'interfaces': set(),
    'layout': {'interfaces'},
    'storage': {'layout', 'interfaces'},
    'cache': {'layout', 'interfaces'},
    'zeo': {'cache', 'storage', 'layout'},
    'server': set(),
    'config': {'zeo', 'cache', 'storage', 'layout'},
    'tools': {'storage', 'cache', 'layout'},
    'cli': {'tools', 'config', 'server', 'storage', 'cache', 'layout'},
    'recipe': {'config', 'layout'},
    'testing': {'cli', 'storage'},
    '__init__': {'storage'},
}


def library_modules():
    """``(room, path)`` of every module outside the tests."""
    for directory, dirs, names in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs
                         if d != 'tests' and not d.startswith(('.', '_')))
        for name in sorted(names):
            if name.endswith('.py'):
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, PACKAGE)
                room = relative.split(os.sep)[0].removesuffix('.py')
                yield room, path


def imported_rooms(tree):
    """The rooms of zodbblob that a module's code imports."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or '']
            if node.module == 'zodbblob':
                names = [f'zodbblob.{a.name}' for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split('.')
            if parts[0] == 'zodbblob' and len(parts) > 1:
                yield parts[1]


class MapTests(unittest.TestCase):

    def test_every_room_is_on_the_map(self):
        rooms = {room for room, _ in library_modules()}
        self.assertEqual(rooms - set(MAY_IMPORT), set())

    def test_imports_point_down_the_map(self):
        wrong = []
        for room, path in library_modules():
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for other in set(imported_rooms(tree)):
                if other != room and other not in MAY_IMPORT.get(room, ()):
                    wrong.append(f'{path} imports zodbblob.{other}')
        self.assertEqual(wrong, [])

    def test_no_module_over_600_lines_no_class_over_400(self):
        large = []
        for _, path in library_modules():
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
