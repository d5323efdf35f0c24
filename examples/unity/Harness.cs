// A console harness for NpcEngineClient.cs: the same code a Unity game uses, run outside
// Unity so CI can compile it with Mono and talk to a live server.
//
//   mcs -out:npc-harness.exe examples/unity/NpcEngineClient.cs examples/unity/Harness.cs
//   mono npc-harness.exe ws://127.0.0.1:8765/ mara "Any rooms free tonight?"
//
// Output is one line per step ("NPCS …", "EVENT …", "DELTA <seq> <json text>", "END …",
// "CANCELLED …", "MEMORY …") so a test can check every step; exit code 0 means all passed.

using System;
using System.Collections.Generic;
using System.Threading.Tasks;
using NpcEngine;

public static class Harness
{
    public static int Main(string[] args)
    {
        if (args.Length < 3)
        {
            Console.Error.WriteLine("usage: npc-harness.exe URL NPC_ID TEXT [TOKEN]");
            return 2;
        }
        try
        {
            return Run(new Uri(args[0]), args[1], args[2], args.Length > 3 ? args[3] : null)
                .GetAwaiter().GetResult();
        }
        catch (Exception exc)
        {
            Console.Error.WriteLine("FAILED " + exc);
            return 1;
        }
    }

    private static async Task<int> Run(Uri url, string npcId, string text, string token)
    {
        using (var client = new NpcEngineClient())
        {
            int deltas = 0;
            int faults = 0;
            client.ReplyDelta += (id, seq, piece) =>
            {
                Console.WriteLine("DELTA " + seq + " " + Json.Serialize(piece));
                deltas++;
            };
            // A game's handler that throws must not stop the client reading.
            client.ReplyFinished += ended => { throw new InvalidOperationException("game bug"); };
            client.HandlerFailed += exc => faults++;
            var welcome = await client.ConnectAsync(url, token, "npc-engine-harness/1.0");
            Console.WriteLine("WELCOME " + welcome["server"]);

            var names = new List<string>();
            foreach (var npc in await client.ListNpcsAsync()) names.Add((string)npc["id"]);
            Console.WriteLine("NPCS " + string.Join(",", names));

            var ids = await client.SendEventAsync(new[] { npcId }, "A travelling bard played in the square.", "csharp", 5);
            Console.WriteLine("EVENT " + ids.Count);

            var context = new Dictionary<string, object> { { "location", "Rusty Anchor" }, { "time_of_day", "night" } };
            var reply = await client.SayAsync(npcId, text, "csharp", context, 24);
            Console.WriteLine("END " + reply.Reason + " " + deltas + " " + Json.Serialize(reply.Text));
            if (reply.Reason != "stop" && reply.Reason != "length") return 1;

            // Cancel a long reply as soon as it starts streaming.
            var cancelId = client.NewRequestId();
            var started = new TaskCompletionSource<bool>();
            client.ReplyStarted += (id, npc) => { if (id == cancelId) started.TrySetResult(true); };
            var longReply = client.SayAsync(npcId, "Tell me the whole history of the town.", "csharp",
                null, 200, null, cancelId);
            await started.Task;
            await client.CancelAsync(cancelId);
            var cancelled = await longReply;
            Console.WriteLine("CANCELLED " + cancelled.Reason);

            try
            {
                await client.SayAsync("nobody", "hello?");
                return 1;
            }
            catch (NpcEngineException error)
            {
                Console.WriteLine("ERROR " + error.Code);
            }

            var memories = await client.ListMemoriesAsync(npcId, "csharp", "bard", 5);
            Console.WriteLine("MEMORY " + memories.Count);

            var flags = new Dictionary<string, object> { { "quest_pier", 2 } };
            await client.SetStateAsync("csharp", npcId, trustDelta: 45, flags: flags);
            var state = await client.GetStateAsync("csharp", npcId);
            var unlocked = (List<object>)state["unlocked"];
            Console.WriteLine("STATE " + state["trust"] + " " + string.Join(",", unlocked));

            var greeting = await client.GreetAsync(npcId, "csharp-stranger");
            var greetUsage = (Dictionary<string, object>)greeting.Raw["usage"];
            Console.WriteLine("GREET " + greetUsage["completion_tokens"] + " " + Json.Serialize(greeting.Text));
            var warm = await client.WarmAsync(new List<string> { npcId });
            Console.WriteLine("WARM " + string.Join(",", (List<object>)warm["warmed"]));
            var speakers = new List<string>();
            var sceneEnd = await client.StartSceneAsync(
                "cs-scene", new List<string> { npcId, "guard_tom" }, topic: "the weather",
                maxTurns: 2, maxTokens: 16, onLine: line => speakers.Add(line.NpcId));
            Console.WriteLine("SCENE " + sceneEnd["reason"] + " " + sceneEnd["turns"] + " " + string.Join(",", speakers));
            await client.SaveCreateAsync("cs-slot");
            await client.SendEventAsync(new List<string> { npcId }, "A gull stole the harness's bread.", "csharp");
            await client.SaveLoadAsync("cs-slot");
            var saves = await client.SaveListAsync();
            var afterLoad = await client.ListMemoriesAsync(npcId, "csharp", "gull bread", 10);
            var gullGone = afterLoad.TrueForAll(m => !((string)m["text"]).Contains("gull"));
            Console.WriteLine("SAVES " + saves.Count + " " + saves[0]["save_id"] + " " + gullGone);
            try
            {
                await client.SaveLoadAsync("no-such-slot");
                Console.WriteLine("SAVEERROR none");
            }
            catch (NpcEngineException error)
            {
                Console.WriteLine("SAVEERROR " + error.Code + " " + error.Details["field"]);
            }
            Console.WriteLine("ACTION " + (reply.GameAction == null ? "null" : reply.GameAction.Name));
            Console.WriteLine("FAULTS " + faults + " " + client.IsConnected);
            await client.CloseAsync();

            // A server that goes away: pending calls fail, IsConnected turns false.
            if (Environment.GetEnvironmentVariable("HARNESS_DROP") != null)
            {
                using (var doomed = new NpcEngineClient())
                {
                    await doomed.ConnectAsync(url, token, "npc-engine-harness/1.0");
                    var pending = doomed.SayAsync(npcId, "Tell me the whole history of the town.",
                        "csharp-drop", null, 200);
                    Console.WriteLine("READY");
                    try
                    {
                        await pending;
                        Console.WriteLine("DROPPED no-error");
                    }
                    catch (NpcEngineException error)
                    {
                        Console.WriteLine("DROPPED " + error.Code + " " + doomed.IsConnected);
                    }
                }
            }
            return 0;
        }
    }
}
