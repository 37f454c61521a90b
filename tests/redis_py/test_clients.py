"""redis-py 8 against the proxy (DESIGN.md "Redis protocol (RESP2 and RESP3)":
a client pointed at RESP_PORT must just work with its defaults).

Run by scripts/test-redis-py.sh, which starts redis-server and the proxy
(writes on) and passes their ports in REDIS_PORT and RESP_PORT.
"""

import os
import unittest

import redis

REDIS_PORT = int(os.environ["REDIS_PORT"])
RESP_PORT = int(os.environ["RESP_PORT"])


def direct():
    return redis.Redis(port=REDIS_PORT, protocol=2, decode_responses=True)


class RedisPy(unittest.TestCase):
    def setUp(self):
        # Through the proxy: FLUSHDB empties its cache too.
        redis.Redis(port=RESP_PORT).flushdb()

    def check_basics(self, r):
        direct().set("k", "v")
        self.assertEqual(r.get("k"), "v")
        self.assertEqual(r.get("k"), "v")  # a hit
        self.assertIsNone(r.get("absent"))
        self.assertEqual(r.exists("k", "absent"), 1)
        self.assertEqual(r.ttl("k"), -1)
        self.assertTrue(r.set("k", "w"))
        self.assertEqual(r.get("k"), "w")  # the write dropped the cached value
        r.hset("h", mapping={"a": "1", "b": "2"})
        self.assertEqual(r.hgetall("h"), {"a": "1", "b": "2"})
        self.assertEqual(r.hgetall("absent"), {})
        self.assertEqual(r.mget("k", "absent"), ["w", None])
        self.assertIn("cache_hits_total", r.info())
        self.assertEqual(r.dbsize(), 2)

    def test_defaults_speak_resp3(self):
        r = redis.Redis(port=RESP_PORT, decode_responses=True)
        self.check_basics(r)
        self.assertIn("resp=3", r.execute_command("CLIENT", "INFO"))

    def test_protocol_2(self):
        r = redis.Redis(port=RESP_PORT, protocol=2, decode_responses=True)
        self.check_basics(r)
        self.assertIn("resp=2", r.execute_command("CLIENT", "INFO"))

    def test_protocol_3(self):
        r = redis.Redis(port=RESP_PORT, protocol=3, decode_responses=True)
        self.check_basics(r)
        self.assertEqual(r.zadd("z", {"a": 1.5}), 1)
        self.assertEqual(r.zrange("z", 0, -1, withscores=True), [["a", 1.5]])

    def test_pipeline_is_a_transaction(self):
        for protocol in (2, 3):
            r = redis.Redis(port=RESP_PORT, protocol=protocol, decode_responses=True)
            r.delete("n")
            pipe = r.pipeline()
            pipe.incr("n").incr("n").get("n").hset("ph", "f", "v").hgetall("ph")
            self.assertEqual(pipe.execute(), [1, 2, "2", 1, {"f": "v"}])
            r.delete("ph")

    def test_pipeline_without_transaction(self):
        r = redis.Redis(port=RESP_PORT, decode_responses=True)
        direct().set("a", "1")
        pipe = r.pipeline(transaction=False)
        pipe.get("a").get("a").exists("a").set("b", "2").get("b").strlen("a")
        self.assertEqual(pipe.execute(), ["1", "1", 1, True, "2", 1])

    def test_registered_script(self):
        r = redis.Redis(port=RESP_PORT, decode_responses=True)
        incr_by = r.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        self.assertEqual(incr_by(keys=["sc"], args=[5]), 5)
        self.assertEqual(incr_by(keys=["sc"], args=[2]), 7)
        self.assertEqual(r.get("sc"), "7")

    def test_scan_iter_and_hgetall(self):
        r = redis.Redis(port=RESP_PORT, decode_responses=True)
        want = {f"key:{i}" for i in range(50)}
        for k in want:
            r.set(k, "x")
        self.assertEqual(set(r.scan_iter(match="key:*", count=7)), want)
        r.hset("big", mapping={f"f{i}": str(i) for i in range(20)})
        self.assertEqual(len(r.hgetall("big")), 20)
        self.assertEqual(r.hgetall("big")["f7"], "7")


if __name__ == "__main__":
    unittest.main(verbosity=2)
