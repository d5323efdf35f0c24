// npc-engine protocol v1 client for Unity and any .NET / Mono program.
//
// Drop this one file into a Unity project (Assets/Scripts/...). It has no dependencies
// beyond the base class library: System.Net.WebSockets.ClientWebSocket for the socket and a
// small JSON reader/writer at the bottom (Unity's JsonUtility cannot read the protocol's
// free-form objects such as `context` and `details`, and requiring Newtonsoft would add a
// package to every game that uses this file).
//
// Threading: frames are read on a background task. If the client is created on a thread
// that has a SynchronizationContext (Unity's main thread has one), every event and every
// awaited result is delivered on that thread, so handlers may touch GameObjects directly.
// Created elsewhere (a console program, a worker thread), events arrive on the reader
// thread; marshal them yourself, e.g. through a ConcurrentQueue drained in Update().
//
//   var client = new NpcEngineClient();
//   await client.ConnectAsync(new Uri("ws://127.0.0.1:8765/"));
//   var reply = await client.SayAsync("mara", "Any rooms free?", "player1",
//       onDelta: text => bubble.text += text);
//   Debug.Log(reply.Text + " (" + reply.Reason + ")");
//
// TLS: a server started with --tls-cert/--tls-key is reached as new Uri("wss://host:8765/");
// .NET checks its certificate against the operating system's trusted CAs (for a studio's
// own CA, install it there). Off loopback, always use wss:// with the token.
// WebGL builds run in the browser and send the page's Origin: start the server with
// --origin https://where-the-game-is-served.example.
// Robustness: a frame that cannot be read, or an exception in one of your handlers, is
// reported through HandlerFailed and reading continues; when the socket drops, every
// pending call fails with NpcEngineException code "disconnected" and IsConnected is false.

using System;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Net.WebSockets;
using System.Text;
using System.Threading;
using System.Threading.Tasks;

namespace NpcEngine
{
    /// <summary>The final <c>reply.end</c> of a <c>say</c>.</summary>
    public sealed class NpcReply
    {
        public string RequestId;
        public string NpcId;
        public string Text;
        /// <summary>stop, length, cancelled or error.</summary>
        public string Reason;
        /// <summary>null, or "secret" / "out_of_world": the reply was cut before it told a
        /// guarded secret or left the world, and ended with an in-character line.</summary>
        public string Guard;
        public string Emotion;
        /// <summary>null, or what the NPC does in the game after its line: Name (a declared
        /// action, e.g. "give_item") and Args (e.g. item = "room_key"); always one the persona
        /// or world declares, with valid arguments.</summary>
        public NpcGameAction GameAction;
        public string ErrorCode;
        public string ErrorMessage;
        /// <summary>Milliseconds from acceptance to the first token, when one came.</summary>
        public double? FirstTokenMs;
        public Dictionary<string, object> Raw;
    }

    /// <summary>A declared game action chosen by the NPC (<c>reply.end.game_action</c>).</summary>
    public sealed class NpcGameAction
    {
        public string Name;
        /// <summary>Argument values: strings for word lists and texts, longs for integers.</summary>
        public Dictionary<string, object> Args = new Dictionary<string, object>();
    }

    /// <summary>An <c>error</c> message from the server, thrown by the awaiting call.</summary>
    public sealed class NpcEngineException : Exception
    {
        public readonly string Code;
        public readonly Dictionary<string, object> Details;

        public NpcEngineException(string code, string message, Dictionary<string, object> details)
            : base(code + ": " + message)
        {
            Code = code;
            Details = details ?? new Dictionary<string, object>();
        }
    }

    public sealed class NpcEngineClient : IDisposable
    {
        /// <summary>A <c>say</c> was accepted: (request id, npc id). Show the NPC "thinking".</summary>
        public event Action<string, string> ReplyStarted;
        /// <summary>A piece of a reply: (request id, seq, text). Append it to the speech bubble.</summary>
        public event Action<string, int, string> ReplyDelta;
        /// <summary>A reply ended (any reason).</summary>
        public event Action<NpcReply> ReplyFinished;
        /// <summary>An <c>error</c> message arrived (also thrown by the awaiting call).</summary>
        public event Action<NpcEngineException> ErrorReceived;
        /// <summary>The connection closed; the string says why. Every pending call has
        /// failed with NpcEngineException code "disconnected" by then.</summary>
        public event Action<string> Disconnected;
        /// <summary>A frame could not be read, or one of your handlers threw: the client
        /// keeps reading (without a handler here, the exception goes to Console.Error).</summary>
        public event Action<Exception> HandlerFailed;

        /// <summary>The server's <c>welcome</c> message.</summary>
        /// <summary>A scene's line is complete: the scene id and the line (NpcId says who).</summary>
        public event Action<string, NpcReply> SceneLineFinished;
        /// <summary>A scene ended: its id, the reason (max_turns, ended, cancelled, error),
        /// and how many lines were spoken.</summary>
        public event Action<string, string, int> SceneEnded;

        public Dictionary<string, object> Welcome { get; private set; }

        private sealed class PendingScene
        {
            public string SceneId;
            public string Speaker;
            public Action<NpcReply> OnLine;
            public readonly TaskCompletionSource<Dictionary<string, object>> Done =
                new TaskCompletionSource<Dictionary<string, object>>(TaskCreationOptions.RunContinuationsAsynchronously);
        }

        private sealed class PendingReply
        {
            public string NpcId;
            public Action<string> OnDelta;
            public readonly StringBuilder Text = new StringBuilder();
            public readonly TaskCompletionSource<NpcReply> Done =
                new TaskCompletionSource<NpcReply>(TaskCreationOptions.RunContinuationsAsynchronously);
        }

        private readonly ClientWebSocket _socket = new ClientWebSocket();
        private readonly SemaphoreSlim _sendLock = new SemaphoreSlim(1, 1);
        private readonly SynchronizationContext _context = SynchronizationContext.Current;
        private readonly object _lock = new object();
        private readonly Dictionary<string, TaskCompletionSource<Dictionary<string, object>>> _answers =
            new Dictionary<string, TaskCompletionSource<Dictionary<string, object>>>();
        private readonly Dictionary<string, PendingReply> _replies = new Dictionary<string, PendingReply>();
        private readonly Dictionary<string, PendingScene> _scenes = new Dictionary<string, PendingScene>();
        private readonly CancellationTokenSource _closing = new CancellationTokenSource();
        private long _nextId;
        private Task _reading;

        public bool IsConnected
        {
            get { return _socket.State == WebSocketState.Open; }
        }

        /// <summary>Open the socket and say hello; returns the <c>welcome</c>.</summary>
        public async Task<Dictionary<string, object>> ConnectAsync(
            Uri url, string token = null, string clientName = "unity-client/1.0",
            CancellationToken cancellation = default(CancellationToken))
        {
            await _socket.ConnectAsync(url, cancellation).ConfigureAwait(false);
            _reading = Task.Run(ReadLoopAsync);
            var hello = Message("hello");
            hello["protocol"] = "1";
            hello["client"] = clientName;
            if (token != null) hello["token"] = token;
            Welcome = await RequestAsync(hello).ConfigureAwait(false);
            return Welcome;
        }

        /// <summary>
        /// Ask an NPC something. Deltas go to <paramref name="onDelta"/> and the ReplyDelta
        /// event; the task completes with the final reply (it never throws for a reply that
        /// was accepted; a rejected say throws NpcEngineException, e.g. code "busy").
        /// </summary>
        public Task<NpcReply> SayAsync(
            string npcId, string text, string playerId = null,
            Dictionary<string, object> context = null, int? maxTokens = null,
            Action<string> onDelta = null, string requestId = null, double? gameTime = null,
            string sceneId = null)
        {
            var message = Message("say", requestId);
            message["npc_id"] = npcId;
            message["text"] = text;
            if (playerId != null) message["player_id"] = playerId;
            if (context != null) message["context"] = context;
            if (maxTokens.HasValue) message["max_tokens"] = maxTokens.Value;
            if (gameTime.HasValue) message["game_time"] = gameTime.Value;
            // In a running scene the player is part of: the answer is the scene's next line.
            if (sceneId != null) message["scene_id"] = sceneId;
            return StreamAsync(message, npcId, onDelta);
        }

        /// <summary>
        /// NPCs talk among themselves (2-6 ids): each finished line goes to
        /// <paramref name="onLine"/> and the SceneLineFinished event; the task completes with
        /// the <c>scene.end</c> (reason, turns). With <paramref name="playerId"/> the player
        /// is present and may join with SayAsync(..., sceneId). Cancel it with
        /// CancelAsync(requestId).
        /// </summary>
        public async Task<Dictionary<string, object>> StartSceneAsync(
            string sceneId, IList<string> npcIds, string playerId = null, string topic = null,
            int? maxTurns = null, int? maxTokens = null, Action<NpcReply> onLine = null,
            string requestId = null)
        {
            var message = Message("scene.start", requestId);
            message["scene_id"] = sceneId;
            message["npc_ids"] = new List<object>(npcIds);
            if (playerId != null) message["player_id"] = playerId;
            if (topic != null) message["topic"] = topic;
            if (maxTurns.HasValue) message["max_turns"] = maxTurns.Value;
            if (maxTokens.HasValue) message["max_tokens"] = maxTokens.Value;
            var id = (string)message["id"];
            var scene = new PendingScene { SceneId = sceneId, OnLine = onLine };
            lock (_lock) _scenes[id] = scene;
            try
            {
                await SendAsync(message).ConfigureAwait(false);
            }
            catch (Exception exc)
            {
                lock (_lock) _scenes.Remove(id);
                throw new NpcEngineException("disconnected", exc.Message, null);
            }
            return await scene.Done.Task.ConfigureAwait(false);
        }

        /// <summary>Game time passed: rumours spread; returns how many were passed on.</summary>
        public async Task<int> WorldTickAsync(double? gameTime = null)
        {
            var message = Message("world.tick");
            if (gameTime.HasValue) message["game_time"] = gameTime.Value;
            var answer = await RequestAsync(message).ConfigureAwait(false);
            return Convert.ToInt32(answer["spread"], CultureInfo.InvariantCulture);
        }

        /// <summary>
        /// The player walks up to <paramref name="npcId"/>: at a first meeting the persona's
        /// greeting arrives at once (no model time); later the NPC greets from what it
        /// remembers. Streams exactly like <see cref="SayAsync"/>.
        /// </summary>
        public Task<NpcReply> GreetAsync(
            string npcId, string playerId = null, Dictionary<string, object> context = null,
            Action<string> onDelta = null, double? gameTime = null)
        {
            var message = Message("greet");
            message["npc_id"] = npcId;
            if (playerId != null) message["player_id"] = playerId;
            if (context != null) message["context"] = context;
            if (gameTime.HasValue) message["game_time"] = gameTime.Value;
            return StreamAsync(message, npcId, onDelta);
        }

        /// <summary>Prepare NPCs' prompts at level load ("*" = every NPC); returns the
        /// <c>ok</c> answer with <c>warmed</c> and <c>ms</c>.</summary>
        public Task<Dictionary<string, object>> WarmAsync(IList<string> npcIds)
        {
            var message = Message("npc.warm");
            message["npc_ids"] = new List<object>(npcIds);
            return RequestAsync(message);
        }

        /// <summary>Save every NPC's memories, conversations, trust and flags as a slot.</summary>
        public Task<Dictionary<string, object>> SaveCreateAsync(string saveId)
        {
            return SaveRequestAsync("save.create", saveId);
        }

        /// <summary>Restore a slot exactly (running replies end first, reason "cancelled");
        /// an unknown slot throws NpcEngineException with Details["field"] == "save_id".</summary>
        public Task<Dictionary<string, object>> SaveLoadAsync(string saveId)
        {
            return SaveRequestAsync("save.load", saveId);
        }

        public Task<Dictionary<string, object>> SaveDeleteAsync(string saveId)
        {
            return SaveRequestAsync("save.delete", saveId);
        }

        /// <summary>The slots: each has save_id, created_at and memories.</summary>
        public async Task<List<Dictionary<string, object>>> SaveListAsync()
        {
            var answer = await RequestAsync(Message("save.list")).ConfigureAwait(false);
            return Objects(answer, "saves");
        }

        private Task<Dictionary<string, object>> SaveRequestAsync(string type, string saveId)
        {
            var message = Message(type);
            message["save_id"] = saveId;
            return RequestAsync(message);
        }

        private async Task<NpcReply> StreamAsync(
            Dictionary<string, object> message, string npcId, Action<string> onDelta)
        {
            var id = (string)message["id"];
            var pending = new PendingReply { NpcId = npcId, OnDelta = onDelta };
            lock (_lock) _replies[id] = pending;
            try
            {
                await SendAsync(message).ConfigureAwait(false);
            }
            catch
            {
                lock (_lock) _replies.Remove(id);
                throw;
            }
            return await pending.Done.Task.ConfigureAwait(false);
        }

        /// <summary>The id the next request will get, e.g. to cancel a say you are about to send.</summary>
        public string NewRequestId()
        {
            return "cs-" + Interlocked.Increment(ref _nextId).ToString(CultureInfo.InvariantCulture);
        }

        /// <summary>End a running or queued say with reason "cancelled".</summary>
        public Task CancelAsync(string targetRequestId)
        {
            var message = Message("cancel");
            message["target"] = targetRequestId;
            return RequestAsync(message);
        }

        /// <summary>Something the NPCs saw or heard; returns the stored memory ids.</summary>
        public async Task<List<string>> SendEventAsync(
            IList<string> npcIds, string text, string playerId = null, int? importance = null,
            double? gameTime = null)
        {
            var message = Message("event");
            message["npc_ids"] = new List<object>(npcIds);
            message["text"] = text;
            if (playerId != null) message["player_id"] = playerId;
            if (importance.HasValue) message["importance"] = importance.Value;
            if (gameTime.HasValue) message["game_time"] = gameTime.Value;
            var answer = await RequestAsync(message).ConfigureAwait(false);
            return Strings(answer, "memory_ids");
        }

        /// <summary>The NPCs the server knows: each has id, name and role.</summary>
        public async Task<List<Dictionary<string, object>>> ListNpcsAsync()
        {
            var answer = await RequestAsync(Message("npc.list")).ConfigureAwait(false);
            return Objects(answer, "npcs");
        }

        /// <summary>An NPC's memories: newest first, or ranked by <paramref name="query"/>.</summary>
        public async Task<List<Dictionary<string, object>>> ListMemoriesAsync(
            string npcId, string playerId = null, string query = null, int limit = 10)
        {
            var message = Message("memory.list");
            message["npc_id"] = npcId;
            if (playerId != null) message["player_id"] = playerId;
            if (query != null) message["query"] = query;
            message["limit"] = limit;
            var answer = await RequestAsync(message).ConfigureAwait(false);
            return Objects(answer, "items");
        }

        /// <summary>Set how <paramref name="npcId"/> regards the player (trust -100..100, or a
        /// delta; needs an NPC) and the player's flags (bool, int or short string; null deletes
        /// one). Returns the <c>state</c> answer: trust, flags, unlocked persona entries, and
        /// <c>facts</c>: what the NPC knows about the player.</summary>
        public Task<Dictionary<string, object>> SetStateAsync(
            string playerId, string npcId = null, int? trust = null, int? trustDelta = null,
            IDictionary<string, object> flags = null)
        {
            var message = Message("state.set");
            message["player_id"] = playerId;
            if (npcId != null) message["npc_id"] = npcId;
            if (trust.HasValue) message["trust"] = trust.Value;
            if (trustDelta.HasValue) message["trust_delta"] = trustDelta.Value;
            if (flags != null) message["flags"] = new Dictionary<string, object>(flags);
            return RequestAsync(message);
        }

        /// <summary>The player's flags, and with <paramref name="npcId"/> that NPC's trust.</summary>
        public Task<Dictionary<string, object>> GetStateAsync(string playerId, string npcId = null)
        {
            var message = Message("state.get");
            message["player_id"] = playerId;
            if (npcId != null) message["npc_id"] = npcId;
            return RequestAsync(message);
        }

        public Task<Dictionary<string, object>> PingAsync()
        {
            return RequestAsync(Message("ping"));
        }

        /// <summary>Close the connection politely; pending calls end with a disconnect.</summary>
        public async Task CloseAsync()
        {
            if (_socket.State == WebSocketState.Open)
            {
                try
                {
                    await _socket.CloseOutputAsync(
                        WebSocketCloseStatus.NormalClosure, "bye", CancellationToken.None).ConfigureAwait(false);
                }
                catch (WebSocketException)
                {
                    // Already gone: the read loop reports the disconnect.
                }
            }
        }

        public void Dispose()
        {
            _closing.Cancel();
            if (_reading != null) _reading.Wait(TimeSpan.FromSeconds(2));
            _socket.Dispose();
        }

        // -- plumbing -------------------------------------------------------------------

        private Dictionary<string, object> Message(string type, string id = null)
        {
            return new Dictionary<string, object> { { "type", type }, { "id", id ?? NewRequestId() } };
        }

        private async Task<Dictionary<string, object>> RequestAsync(Dictionary<string, object> message)
        {
            var id = (string)message["id"];
            var answer = new TaskCompletionSource<Dictionary<string, object>>(
                TaskCreationOptions.RunContinuationsAsynchronously);
            lock (_lock) _answers[id] = answer;
            try
            {
                await SendAsync(message).ConfigureAwait(false);
            }
            catch (Exception exc)
            {
                lock (_lock) _answers.Remove(id);
                throw new NpcEngineException("disconnected", exc.Message, null);
            }
            return await answer.Task.ConfigureAwait(false);
        }

        private async Task SendAsync(Dictionary<string, object> message)
        {
            var bytes = Encoding.UTF8.GetBytes(Json.Serialize(message));
            // ClientWebSocket allows one send at a time.
            await _sendLock.WaitAsync().ConfigureAwait(false);
            try
            {
                await _socket.SendAsync(
                    new ArraySegment<byte>(bytes), WebSocketMessageType.Text, true, _closing.Token).ConfigureAwait(false);
            }
            finally
            {
                _sendLock.Release();
            }
        }

        private async Task ReadLoopAsync()
        {
            var buffer = new byte[16 * 1024];
            var frame = new MemoryStream();
            string why = "closed";
            try
            {
                while (_socket.State == WebSocketState.Open)
                {
                    var result = await _socket.ReceiveAsync(new ArraySegment<byte>(buffer), _closing.Token)
                        .ConfigureAwait(false);
                    if (result.MessageType == WebSocketMessageType.Close)
                    {
                        why = "closed by server: " + result.CloseStatus + " " + result.CloseStatusDescription;
                        break;
                    }
                    frame.Write(buffer, 0, result.Count);
                    if (!result.EndOfMessage) continue;
                    var text = Encoding.UTF8.GetString(frame.ToArray());
                    frame.SetLength(0);
                    // One unreadable frame or one failing handler must not stop the reading:
                    // the connection would look open while nothing is received any more.
                    try
                    {
                        var message = Json.Parse(text) as Dictionary<string, object>;
                        if (message != null) Dispatch(message);
                    }
                    catch (Exception exc)
                    {
                        ReportFault(exc);
                    }
                }
            }
            catch (Exception exc)
            {
                why = exc.Message;
            }
            finally
            {
                // Reading has stopped: the socket must not claim to be connected.
                if (_socket.State == WebSocketState.Open || _socket.State == WebSocketState.CloseReceived)
                    _socket.Abort();
            }
            FailEverything(why);
        }

        private void ReportFault(Exception exc)
        {
            var handler = HandlerFailed;
            if (handler == null)
            {
                Console.Error.WriteLine("NpcEngineClient: " + exc);
                return;
            }
            try { handler(exc); }
            catch (Exception inner) { Console.Error.WriteLine("NpcEngineClient: " + inner); }
        }

        private void Dispatch(Dictionary<string, object> message)
        {
            var type = Str(message, "type");
            var re = Str(message, "re");
            PendingReply reply = null;
            PendingScene scene = null;
            TaskCompletionSource<Dictionary<string, object>> answer = null;
            lock (_lock)
            {
                if (re != null && _scenes.TryGetValue(re, out scene) && (type == "scene.end" || type == "error"))
                    _scenes.Remove(re);
            }
            if (scene != null)
            {
                DispatchScene(scene, type, message);
                return;
            }
            lock (_lock)
            {
                if (re != null && _replies.TryGetValue(re, out reply) && (type == "reply.end" || type == "error"))
                    _replies.Remove(re);
                if (reply == null && re != null && _answers.TryGetValue(re, out answer))
                    _answers.Remove(re);
            }
            if (type == "error")
            {
                var details = message.ContainsKey("details") ? message["details"] as Dictionary<string, object> : null;
                var error = new NpcEngineException(Str(message, "code"), Str(message, "message"), details);
                Post(() => { if (ErrorReceived != null) ErrorReceived(error); });
                if (reply != null) reply.Done.TrySetException(error);
                else if (answer != null) answer.TrySetException(error);
                return;
            }
            if (reply != null)
            {
                if (type == "reply.start")
                {
                    Post(() => { if (ReplyStarted != null) ReplyStarted(re, reply.NpcId); });
                }
                else if (type == "reply.delta")
                {
                    var text = Str(message, "text") ?? "";
                    var seq = Convert.ToInt32(message["seq"], CultureInfo.InvariantCulture);
                    reply.Text.Append(text);
                    Post(() =>
                    {
                        if (reply.OnDelta != null) reply.OnDelta(text);
                        if (ReplyDelta != null) ReplyDelta(re, seq, text);
                    });
                }
                else if (type == "reply.end")
                {
                    var final = ToReply(message, reply.NpcId);
                    Post(() =>
                    {
                        // The awaiting call completes even when a game's handler throws.
                        try { if (ReplyFinished != null) ReplyFinished(final); }
                        finally { reply.Done.TrySetResult(final); }
                    });
                }
                return;
            }
            if (answer != null) answer.TrySetResult(message);
        }

        private void DispatchScene(PendingScene scene, string type, Dictionary<string, object> message)
        {
            if (type == "reply.start")
            {
                scene.Speaker = Str(message, "npc_id");
            }
            else if (type == "reply.end")
            {
                var line = ToReply(message, scene.Speaker);
                Post(() =>
                {
                    if (scene.OnLine != null) scene.OnLine(line);
                    if (SceneLineFinished != null) SceneLineFinished(scene.SceneId, line);
                });
            }
            else if (type == "scene.end")
            {
                var reason = Str(message, "reason");
                var turns = Convert.ToInt32(message["turns"], CultureInfo.InvariantCulture);
                Post(() =>
                {
                    try { if (SceneEnded != null) SceneEnded(scene.SceneId, reason, turns); }
                    finally { scene.Done.TrySetResult(message); }
                });
            }
            else if (type == "error")
            {
                var details = message.ContainsKey("details") ? message["details"] as Dictionary<string, object> : null;
                scene.Done.TrySetException(new NpcEngineException(Str(message, "code"), Str(message, "message"), details));
            }
        }

        private static NpcReply ToReply(Dictionary<string, object> message, string npcId)
        {
            var reply = new NpcReply
            {
                RequestId = Str(message, "re"),
                NpcId = npcId,
                Text = Str(message, "text") ?? "",
                Reason = Str(message, "reason"),
                Guard = Str(message, "guard"),
                Emotion = Str(message, "emotion"),
                Raw = message,
            };
            var action = message.ContainsKey("game_action")
                ? message["game_action"] as Dictionary<string, object> : null;
            if (action != null)
            {
                reply.GameAction = new NpcGameAction { Name = Str(action, "name") };
                var args = action.ContainsKey("args") ? action["args"] as Dictionary<string, object> : null;
                if (args != null) reply.GameAction.Args = args;
            }
            var error = message.ContainsKey("error") ? message["error"] as Dictionary<string, object> : null;
            if (error != null)
            {
                reply.ErrorCode = Str(error, "code");
                reply.ErrorMessage = Str(error, "message");
            }
            var usage = message.ContainsKey("usage") ? message["usage"] as Dictionary<string, object> : null;
            if (usage != null && usage.ContainsKey("ttft_ms") && usage["ttft_ms"] != null)
                reply.FirstTokenMs = Convert.ToDouble(usage["ttft_ms"], CultureInfo.InvariantCulture);
            return reply;
        }

        private void FailEverything(string why)
        {
            List<PendingReply> replies;
            List<PendingScene> scenes;
            List<TaskCompletionSource<Dictionary<string, object>>> answers;
            lock (_lock)
            {
                replies = new List<PendingReply>(_replies.Values);
                scenes = new List<PendingScene>(_scenes.Values);
                answers = new List<TaskCompletionSource<Dictionary<string, object>>>(_answers.Values);
                _replies.Clear();
                _scenes.Clear();
                _answers.Clear();
            }
            var error = new NpcEngineException("disconnected", why, null);
            foreach (var reply in replies) reply.Done.TrySetException(error);
            foreach (var scene in scenes) scene.Done.TrySetException(error);
            foreach (var answer in answers) answer.TrySetException(error);
            Post(() => { if (Disconnected != null) Disconnected(why); });
        }

        private void Post(Action action)
        {
            Action guarded = () =>
            {
                try { action(); }
                catch (Exception exc) { ReportFault(exc); }  // a game's handler threw
            };
            if (_context != null) _context.Post(_ => guarded(), null);
            else guarded();
        }

        private static string Str(Dictionary<string, object> message, string key)
        {
            object value;
            return message.TryGetValue(key, out value) ? value as string : null;
        }

        private static List<string> Strings(Dictionary<string, object> message, string key)
        {
            var result = new List<string>();
            object value;
            if (message.TryGetValue(key, out value) && value is List<object>)
                foreach (var item in (List<object>)value) result.Add(item as string);
            return result;
        }

        private static List<Dictionary<string, object>> Objects(Dictionary<string, object> message, string key)
        {
            var result = new List<Dictionary<string, object>>();
            object value;
            if (message.TryGetValue(key, out value) && value is List<object>)
                foreach (var item in (List<object>)value) result.Add(item as Dictionary<string, object>);
            return result;
        }
    }

    /// <summary>
    /// Minimal JSON for the protocol: objects become Dictionary&lt;string, object&gt;, arrays
    /// List&lt;object&gt;, numbers long or double, plus string, bool and null.
    /// </summary>
    public static class Json
    {
        public static string Serialize(object value)
        {
            var builder = new StringBuilder();
            Write(builder, value);
            return builder.ToString();
        }

        public static object Parse(string text)
        {
            var reader = new Reader(text);
            var value = reader.Value();
            reader.SkipSpace();
            if (!reader.AtEnd) throw new FormatException("trailing characters after JSON value");
            return value;
        }

        private static void Write(StringBuilder builder, object value)
        {
            if (value == null) builder.Append("null");
            else if (value is string) WriteString(builder, (string)value);
            else if (value is bool) builder.Append((bool)value ? "true" : "false");
            else if (value is System.Collections.IDictionary)
            {
                var dictionary = (System.Collections.IDictionary)value;
                builder.Append('{');
                var first = true;
                foreach (System.Collections.DictionaryEntry entry in dictionary)
                {
                    if (!first) builder.Append(',');
                    first = false;
                    WriteString(builder, Convert.ToString(entry.Key, CultureInfo.InvariantCulture));
                    builder.Append(':');
                    Write(builder, entry.Value);
                }
                builder.Append('}');
            }
            else if (value is System.Collections.IEnumerable)
            {
                builder.Append('[');
                var first = true;
                foreach (var item in (System.Collections.IEnumerable)value)
                {
                    if (!first) builder.Append(',');
                    first = false;
                    Write(builder, item);
                }
                builder.Append(']');
            }
            else if (value is float || value is double)
                builder.Append(Convert.ToDouble(value, CultureInfo.InvariantCulture).ToString("R", CultureInfo.InvariantCulture));
            else if (value is IConvertible)
                builder.Append(Convert.ToString(value, CultureInfo.InvariantCulture));
            else WriteString(builder, value.ToString());
        }

        private static void WriteString(StringBuilder builder, string text)
        {
            builder.Append('"');
            foreach (var c in text)
            {
                switch (c)
                {
                    case '"': builder.Append("\\\""); break;
                    case '\\': builder.Append("\\\\"); break;
                    case '\n': builder.Append("\\n"); break;
                    case '\r': builder.Append("\\r"); break;
                    case '\t': builder.Append("\\t"); break;
                    default:
                        if (c < ' ') builder.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
                        else builder.Append(c);
                        break;
                }
            }
            builder.Append('"');
        }

        private sealed class Reader
        {
            private readonly string _text;
            private int _at;

            public Reader(string text)
            {
                _text = text;
            }

            public bool AtEnd
            {
                get { return _at >= _text.Length; }
            }

            public void SkipSpace()
            {
                while (!AtEnd && char.IsWhiteSpace(_text[_at])) _at++;
            }

            public object Value()
            {
                SkipSpace();
                if (AtEnd) throw new FormatException("unexpected end of JSON");
                var c = _text[_at];
                if (c == '{') return ObjectValue();
                if (c == '[') return ArrayValue();
                if (c == '"') return StringValue();
                if (Take("true")) return true;
                if (Take("false")) return false;
                if (Take("null")) return null;
                return NumberValue();
            }

            private bool Take(string word)
            {
                if (string.CompareOrdinal(_text, _at, word, 0, word.Length) != 0) return false;
                _at += word.Length;
                return true;
            }

            private void Expect(char c)
            {
                SkipSpace();
                if (AtEnd || _text[_at] != c) throw new FormatException("expected '" + c + "' at " + _at);
                _at++;
            }

            private Dictionary<string, object> ObjectValue()
            {
                var result = new Dictionary<string, object>();
                Expect('{');
                SkipSpace();
                if (!AtEnd && _text[_at] == '}') { _at++; return result; }
                while (true)
                {
                    SkipSpace();
                    var key = StringValue();
                    Expect(':');
                    result[key] = Value();
                    SkipSpace();
                    if (!AtEnd && _text[_at] == ',') { _at++; continue; }
                    Expect('}');
                    return result;
                }
            }

            private List<object> ArrayValue()
            {
                var result = new List<object>();
                Expect('[');
                SkipSpace();
                if (!AtEnd && _text[_at] == ']') { _at++; return result; }
                while (true)
                {
                    result.Add(Value());
                    SkipSpace();
                    if (!AtEnd && _text[_at] == ',') { _at++; continue; }
                    Expect(']');
                    return result;
                }
            }

            private string StringValue()
            {
                Expect('"');
                var builder = new StringBuilder();
                while (true)
                {
                    if (AtEnd) throw new FormatException("unterminated string");
                    var c = _text[_at++];
                    if (c == '"') return builder.ToString();
                    if (c != '\\') { builder.Append(c); continue; }
                    if (AtEnd) throw new FormatException("unterminated escape");
                    var escape = _text[_at++];
                    switch (escape)
                    {
                        case 'n': builder.Append('\n'); break;
                        case 'r': builder.Append('\r'); break;
                        case 't': builder.Append('\t'); break;
                        case 'b': builder.Append('\b'); break;
                        case 'f': builder.Append('\f'); break;
                        case 'u':
                            if (_at + 4 > _text.Length) throw new FormatException("short \\u escape");
                            builder.Append((char)int.Parse(_text.Substring(_at, 4), NumberStyles.HexNumber, CultureInfo.InvariantCulture));
                            _at += 4;
                            break;
                        default: builder.Append(escape); break;
                    }
                }
            }

            private object NumberValue()
            {
                var start = _at;
                while (!AtEnd && "+-0123456789.eE".IndexOf(_text[_at]) >= 0) _at++;
                var token = _text.Substring(start, _at - start);
                if (token.Length == 0) throw new FormatException("unexpected character at " + start);
                long whole;
                if (token.IndexOfAny(new[] { '.', 'e', 'E' }) < 0 &&
                    long.TryParse(token, NumberStyles.Integer, CultureInfo.InvariantCulture, out whole))
                    return whole;
                return double.Parse(token, NumberStyles.Float, CultureInfo.InvariantCulture);
            }
        }
    }
}
