import signal


# A shell starts a background job (`cmd &`, a CI runner without a
# terminal) with SIGINT ignored, and an ignored signal stays ignored in
# every child it executes, so the tests that press Ctrl-C on a tool or a
# server would see nothing happen.  A handled signal is reset to its
# default in a child: the children then get Python's KeyboardInterrupt.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
