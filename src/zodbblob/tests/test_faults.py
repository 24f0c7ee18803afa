"""The fault proxy does to real HTTP traffic on loopback what it says.

A real ``ThreadingHTTPServer`` runs in a thread of the test; clients
(``http.client`` and raw sockets) talk to it through a `FaultProxy`.
"""

import contextlib
import http.client
import http.server
import socket
import threading
import unittest

from zodbblob import faults
from zodbblob.faults import FaultProxy, RequestFraming

WAIT = 60  # seconds a client waits where nothing should stall


class Handler(http.server.BaseHTTPRequestHandler):
    """GET /N answers N bytes; PUT answers the size of the body it read."""

    protocol_version = 'HTTP/1.1'

    def date_time_string(self, timestamp=None):
        return 'Sat, 05 Dec 2026 00:00:00 GMT'  # answers stay byte-equal

    def version_string(self):
        return 'test'

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = bytes(i % 251 for i in range(int(self.path[1:])))
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        if 'chunked' in self.headers.get('Transfer-Encoding', ''):
            body = b''
            while size := int(self.rfile.readline().split(b';')[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers['Content-Length']))
        if len(body) < int(self.headers.get('Content-Length', 0)):
            return  # the proxy cut it: no answer to give
        self.server.bodies.append(body)
        answer = str(len(body)).encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


class Server(http.server.ThreadingHTTPServer):

    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client the proxy cut off: not this server's fault


class Sink:
    """A raw TCP server that keeps all bytes of each connection."""

    def __init__(self):
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.address = self.listener.getsockname()
        self.received = []
        self.thread = threading.Thread(target=self.take, daemon=True)
        self.thread.start()

    def take(self):
        connection, _ = self.listener.accept()
        with connection:
            data = b''
            while chunk := connection.recv(65536):
                data += chunk
        self.received.append(data)

    def close(self):
        self.listener.close()
        self.thread.join(WAIT)


def tcp_sockets(side, port):
    """Open sockets (not in TIME_WAIT) of this process's kind whose `side`
    ('local' or 'remote') is 127.0.0.1:`port`."""
    column = {'local': 1, 'remote': 2}[side]
    address = f'0100007F:{port:04X}'  # /proc/net/tcp's 127.0.0.1:port
    with open('/proc/net/tcp') as f:
        rows = [row.split() for row in f.read().splitlines()[1:]]
    return [row for row in rows if row[column] == address and row[9] != '0']


class ProxyTestCase(unittest.TestCase):

    def setUp(self):
        self.server = Server(('127.0.0.1', 0), Handler)
        self.server.bodies = []
        self.serving = threading.Thread(target=self.server.serve_forever,
                                        args=(0.05,))
        self.serving.start()
        self.proxy = FaultProxy(self.server.server_address).start()

    def tearDown(self):
        if self.proxy.acceptor.is_alive():
            self.proxy.stop()
        self.server.shutdown()
        self.server.server_close()
        self.serving.join(WAIT)

    def connect(self, timeout=WAIT):
        connection = http.client.HTTPConnection(*self.proxy.address,
                                                timeout=timeout)
        self.addCleanup(connection.close)
        return connection

    def raw(self, data, timeout=WAIT):
        """Send `data` on a new connection; all bytes until EOF."""
        with socket.create_connection(self.proxy.address, timeout) as sock:
            sock.sendall(data)
            answer = b''
            while chunk := sock.recv(65536):
                answer += chunk
        return answer

    def get(self, path, connection=None):
        if connection is None:
            with contextlib.closing(self.connect()) as connection:
                return self.get(path, connection)
        connection.request('GET', path)
        response = connection.getresponse()
        return response.status, response.read()


class PassTests(ProxyTestCase):

    def test_pass_returns_the_body_and_counts_requests(self):
        connection = self.connect()
        self.assertEqual(self.get('/300000', connection),
                         (200, bytes(i % 251 for i in range(300000))))
        self.assertEqual(self.get('/5', connection), (200, bytes(range(5))))
        connection.close()
        self.assertEqual((self.proxy.connections, self.proxy.requests),
                         (1, 2))

    def test_a_chunked_upload_passes_whole(self):
        connection = self.connect()
        connection.request('PUT', '/key', body=iter([b'a' * 70000, b'b']),
                           encode_chunked=True)
        self.assertEqual(connection.getresponse().read(), b'70001')
        self.assertEqual(self.server.bodies, [b'a' * 70000 + b'b'])
        self.assertEqual(self.proxy.requests, 1)

    def test_the_proxy_listens_on_loopback_only(self):
        with self.assertRaisesRegex(ValueError, "'0.0.0.0'.*127.0.0.1"):
            FaultProxy(self.server.server_address, host='0.0.0.0')
        with self.assertRaisesRegex(ValueError, "target '10.1.2.3'"):
            FaultProxy(('10.1.2.3', 80))
        with self.assertRaisesRegex(ValueError, "mode 'cut'"):
            self.proxy.mode = 'cut'


class RefuseResetStallTests(ProxyTestCase):

    def test_refuse_makes_connect_fail_until_the_mode_changes(self):
        self.proxy.mode = faults.REFUSE
        self.assertEqual(self.proxy.mode, faults.REFUSE)
        # The accept thread closes the listener when woken; a refused
        # connect is what the test waits for, with a bound on attempts.
        for _ in range(10000):
            try:
                socket.create_connection(self.proxy.address, WAIT).close()
            except ConnectionRefusedError:
                break
            except ConnectionResetError:
                continue  # was in the backlog as the listener closed
        else:
            self.fail('connect to a refusing proxy did not fail')
        with self.assertRaises(ConnectionRefusedError):
            self.get('/1')
        self.proxy.mode = 'pass'
        for _ in range(10000):
            try:
                self.assertEqual(self.get('/3'), (200, bytes(range(3))))
                break
            except ConnectionRefusedError:
                continue
        else:
            self.fail('the proxy did not listen again')

    def test_reset_ends_the_connection_with_rst(self):
        self.proxy.mode = faults.RESET
        # Nothing sent, so nothing unread: only SO_LINGER 0 makes an RST,
        # which may come before connect() returns.
        with self.assertRaises(ConnectionResetError):
            with socket.create_connection(self.proxy.address, WAIT) as sock:
                sock.recv(100)
        with self.assertRaises(ConnectionResetError):
            self.get('/1')
        self.assertEqual((self.proxy.connections, self.proxy.requests),
                         (2, 0))

    def test_stall_makes_a_client_time_out_and_stop_ends_it(self):
        self.proxy.mode = faults.STALL
        sock = socket.create_connection(self.proxy.address, WAIT)
        self.addCleanup(sock.close)
        sock.sendall(b'GET /1 HTTP/1.1\r\nHost: x\r\n\r\n')
        with self.assertRaises(TimeoutError):
            self.get('/1', self.connect(timeout=1))
        self.proxy.stop()
        self.assertEqual(sock.recv(100), b'')  # EOF, not a timeout

    def test_stalled_connections_close_when_the_mode_changes(self):
        self.proxy.mode = faults.STALL
        sock = socket.create_connection(self.proxy.address, WAIT)
        self.addCleanup(sock.close)
        sock.sendall(b'PUT /k HTTP/1.1\r\nContent-Length: 2\r\n\r\nab')
        self.proxy.wait_for(connections=1, requests=1)
        self.proxy.mode = faults.PASS
        self.assertEqual(sock.recv(100), b'')
        self.assertEqual(self.get('/2'), (200, bytes(range(2))))


class ErrorTests(ProxyTestCase):

    def test_error_answers_the_status_and_the_s3_code(self):
        self.proxy.mode = faults.error(503, 'SlowDown')
        connection = self.connect()
        for _ in range(2):  # keep-alive: one connection, two answers
            connection.request('GET', '/key?a&b')
            response = connection.getresponse()
            body = response.read()
            self.assertEqual(response.status, 503)
            self.assertEqual(response.getheader('Content-Type'),
                             'application/xml')
            self.assertIn(b'<Error><Code>SlowDown</Code>', body)
            self.assertIn(b'<Resource>/key?a&amp;b</Resource>', body)
        self.assertEqual((self.proxy.connections, self.proxy.requests),
                         (1, 2))

    def test_connection_close_is_honoured(self):
        self.proxy.mode = faults.error(500, 'InternalError')
        answer = self.raw(b'HEAD /k HTTP/1.1\r\nConnection: close\r\n\r\n')
        head, _, body = answer.partition(b'\r\n\r\n')
        self.assertTrue(head.startswith(b'HTTP/1.1 500 Internal Server'))
        self.assertIn(b'Connection: close', head)
        self.assertEqual(body, b'')  # HEAD: no body, and EOF after it

    def test_a_chunked_upload_is_read_whole_before_the_answer(self):
        self.proxy.mode = faults.error(503, 'SlowDown')
        connection = self.connect()
        connection.request('PUT', '/key', body=iter([b'a' * 70000, b'b']),
                           encode_chunked=True)
        response = connection.getresponse()
        self.assertIn(b'<Code>SlowDown</Code>', response.read())
        self.assertEqual(self.get('/1', connection)[0], 503)
        self.assertEqual(self.proxy.requests, 2)
        self.assertEqual(self.server.bodies, [])

    def test_pipelined_uploads_get_one_answer_each(self):
        # Were a body not read whole, its bytes would be taken for the
        # next request's head and the answers would not come in pairs.
        self.proxy.mode = faults.error(503, 'SlowDown')
        chunked = (b'PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n'
                   b'Expect: 100-continue\r\n\r\n'
                   b'5;chunk-signature=x\r\nGET /\r\n0\r\nx-amz-checksum: y'
                   b'\r\n\r\n')
        sized = b'PUT /b HTTP/1.1\r\nContent-Length: 7\r\n\r\nHEAD /x'
        last = b'GET /c HTTP/1.1\r\nConnection: close\r\n\r\n'
        answer = self.raw(chunked + sized + last)
        self.assertEqual(answer.count(b'HTTP/1.1 100 Continue\r\n\r\n'), 1)
        self.assertEqual(answer.count(b'HTTP/1.1 503 Service Unavailable'),
                         3)
        self.assertEqual(
            [answer.count(f'<Resource>{t}</Resource>'.encode())
             for t in ('/a', '/b', '/c', '/', '/x')], [1, 1, 1, 0, 0])
        self.assertEqual(self.proxy.requests, 3)

    def test_the_framing_ends_a_request_only_with_its_body(self):
        framing = RequestFraming()
        head = b'PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n'
        self.assertEqual([e for e, _ in framing.feed(head + b'3\r\nab')],
                         ['head'])
        self.assertEqual(framing.feed(b'c\r\n0\r\n'), [])
        self.assertEqual([e for e, _ in framing.feed(b'\r\n')], ['end'])
        framing = RequestFraming()
        self.assertEqual([e for e, _ in framing.feed(
            b'PUT /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nab')], ['head'])
        self.assertEqual([e for e, _ in framing.feed(b'c')], ['end'])

    def test_a_status_that_is_no_error_is_refused(self):
        with self.assertRaisesRegex(ValueError, 'HTTP status 200'):
            faults.error(200, 'OK')


class CutTests(ProxyTestCase):

    REQUEST = b'GET /1000 HTTP/1.1\r\nHost: x\r\n\r\n'

    def test_cut_response_gives_exactly_n_bytes_then_eof(self):
        whole = self.raw(self.REQUEST + b'GET /1 HTTP/1.1\r\n'
                         b'Connection: close\r\n\r\n')
        self.proxy.mode = faults.cut_response_after(250)
        self.assertEqual(self.raw(self.REQUEST), whole[:250])
        self.proxy.mode = faults.cut_response_after(0)
        self.assertEqual(self.raw(self.REQUEST), b'')

    def test_cut_response_in_the_body_is_an_incomplete_read(self):
        self.proxy.mode = faults.cut_response_after(200)
        response = self.connect()
        response.request('GET', '/1000')
        response = response.getresponse()
        self.assertEqual(response.status, 200)
        with self.assertRaises(http.client.IncompleteRead) as caught:
            response.read()
        head = 200 - len(caught.exception.partial)
        self.assertEqual(caught.exception.partial,
                         bytes(i % 251 for i in range(200 - head)))

    def test_the_cut_counts_all_the_answers_on_a_connection(self):
        first = len(self.raw(b'GET /5 HTTP/1.1\r\nConnection: close\r\n\r\n'))
        self.proxy.mode = faults.cut_response_after(first)
        pooled = self.connect()
        self.assertEqual(self.get('/5', pooled), (200, bytes(range(5))))
        with self.assertRaises(ConnectionResetError):  # RemoteDisconnected
            self.get('/5', pooled)

    def test_cut_request_gives_the_server_exactly_n_bytes(self):
        sink = Sink()
        self.addCleanup(sink.close)
        with FaultProxy(sink.address) as proxy:
            proxy.mode = faults.cut_request_after(50)
            with socket.create_connection(proxy.address, WAIT) as sock:
                sock.sendall(b'x' * 1000)
                try:
                    self.assertEqual(sock.recv(100), b'')
                except ConnectionResetError:
                    pass  # the proxy closed with our bytes unread
            sink.thread.join(WAIT)
        self.assertEqual(sink.received, [b'x' * 50])

    def test_cut_request_mid_upload_fails_the_client(self):
        self.proxy.mode = faults.cut_request_after(100)
        connection = self.connect()
        with self.assertRaises((ConnectionResetError, BrokenPipeError)):
            connection.request('PUT', '/key', body=b'z' * 100000)
            connection.getresponse()
        self.assertEqual(self.server.bodies, [])


class SwitchAndStopTests(ProxyTestCase):

    def test_a_new_mode_applies_to_new_connections(self):
        old = self.connect()
        self.assertEqual(self.get('/1', old), (200, bytes(1)))
        self.proxy.mode = faults.error(503, 'SlowDown')
        self.assertEqual(self.get('/1', old), (200, bytes(1)))
        self.assertEqual(self.get('/1')[0], 503)
        self.proxy.mode = faults.PASS
        self.assertEqual(self.get('/1'), (200, bytes(1)))
        self.assertEqual((self.proxy.connections, self.proxy.requests),
                         (3, 4))
        self.proxy.reset_counts()
        self.assertEqual((self.proxy.connections, self.proxy.requests),
                         (0, 0))

    def test_disconnect_moves_a_pooled_connection_to_the_new_mode(self):
        pooled = self.connect()
        self.assertEqual(self.get('/1', pooled), (200, bytes(1)))
        self.proxy.mode = faults.error(503, 'SlowDown')
        self.proxy.disconnect()
        # http.client opens a new connection once it sees the old closed.
        with self.assertRaises(ConnectionResetError):  # RemoteDisconnected
            self.get('/1', pooled)
        self.assertEqual(self.get('/1', pooled)[0], 503)
        self.assertEqual(self.proxy.connections, 2)

    def test_stop_leaves_no_thread_and_no_socket(self):
        before = set(threading.enumerate())
        held = self.connect()
        self.get('/1', held)                      # a relaying connection
        self.proxy.mode = faults.STALL
        stalled = socket.create_connection(self.proxy.address, WAIT)
        stalled.sendall(b'GET / HTTP/1.1\r\n')
        self.proxy.wait_for(connections=2)
        self.proxy.mode = faults.error(503, 'SlowDown')
        erring = self.connect()
        self.assertEqual(self.get('/1', erring)[0], 503)
        self.proxy.mode = faults.STALL
        stalled2 = socket.create_connection(self.proxy.address, WAIT)
        self.proxy.wait_for(connections=4)
        # The proxy's threads are there before stop...
        names = [t.name for t in threading.enumerate()]
        self.assertTrue(any(n.startswith('FaultProxy') for n in names))
        self.proxy.stop()
        names = [t.name for t in set(threading.enumerate()) - before]
        self.assertEqual([n for n in names if n.startswith('FaultProxy')],
                         [])
        # ...and so are its sockets: those on its port, and those to the
        # server's that the proxy opened (the server's own are on its
        # port as local port only).
        port = self.proxy.address[1]
        self.assertEqual(tcp_sockets('local', port), [])
        target = self.server.server_address[1]
        self.assertEqual(tcp_sockets('remote', target), [])
        for sock in (held.sock, stalled, erring.sock, stalled2):
            self.assertEqual(sock.recv(100), b'')
            sock.close()
        self.assertEqual(self.proxy.wake_r.fileno(), -1)
