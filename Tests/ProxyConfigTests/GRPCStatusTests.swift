import ProxyConfig
import Testing

@Suite struct GRPCStatusTests {
  @Test func readsAHeaderValueAndKeepsANumberItDoesNotKnow() {
    #expect(GRPCStatus(headerValue: "14") == .unavailable)
    #expect(GRPCStatus(headerValue: "99")?.rawValue == 99)
    #expect(GRPCStatus(headerValue: "99")?.snakeName == "99")
    #expect(GRPCStatus(headerValue: "x") == nil)
    #expect(GRPCStatus(headerValue: "") == nil)
  }

  @Test func namesAsEnvoysAccessLogSpellsThem() {
    #expect(GRPCStatus.cancelled.camelName == "Canceled")
    #expect(GRPCStatus.cancelled.snakeName == "CANCELLED")
    #expect(GRPCStatus.internalError.camelName == "Internal")
    #expect(GRPCStatus(name: "CANCELED") == .cancelled)
    #expect(GRPCStatus(name: "UNAUTHENTICATED") == .unauthenticated)
    #expect(GRPCStatus(name: "Unavailable") == nil)
  }
}
