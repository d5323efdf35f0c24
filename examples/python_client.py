"""Talk to a running `npc-engine serve` from Python (protocol v1).

.venv/bin/python examples/python_client.py mara "Any rooms free tonight?" [--player aria]
"""

from __future__ import annotations

import argparse
import asyncio

from npc_engine.client import NpcClient


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("npc")
    parser.add_argument("text")
    parser.add_argument("--player", default="player")
    parser.add_argument("--url", default="ws://127.0.0.1:8765/")
    parser.add_argument("--token")
    args = parser.parse_args()
    async with await NpcClient.connect(args.url, token=args.token) as client:
        reply = await client.say(args.npc, args.text, player_id=args.player)
        async for delta in reply:
            print(delta, end="", flush=True)
        end = await reply.result()
        print(f"\n[{end['reason']} · {end.get('usage')}]")


if __name__ == "__main__":
    asyncio.run(main())
